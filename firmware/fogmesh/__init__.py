# fogmesh node firmware (MicroPython). Modules are imported one by one, on demand, to keep the
# heap of a plain ESP32 free: `from fogmesh.int8 import Model`.
