"""Modbus TCP and RTU devices: the tag map (`config`), the register codec (`codec`) and the
request planner (`plan`) are pure code; only the adapter module imports pymodbus.

Nothing is imported here: gateway.config imports the config module through this package, and a
config load must not pull in a vendor library.
"""
