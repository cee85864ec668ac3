"""The ESP-NOW mesh behind its root node: the UART codec (`uart`), the serial link that owns the
port (`link`), the device config (`config`) and the `mesh` adapter (`adapter`); docs/mesh-adapter.md.

Nothing is imported here: gateway.config imports the config module through this package, and a
config load must not open serial ports or pull in pyserial.
"""
