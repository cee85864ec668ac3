"""Training, quantization, export and evaluation of the anomaly models, and the shipped model files.

Empty until the edge-intelligence issue lands; the folder is part of the package layout.
"""
