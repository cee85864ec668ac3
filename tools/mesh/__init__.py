"""The ESP-NOW mesh on the host: frame codec and keys, radio medium, simulator, benchmark."""
