"""The `opcua` device type: an OPC-UA server read through one subscription (or polled with one Read
per period), with allow-listed, range- and type-checked writes and Basic256Sha256 security.

The config schema is `retrofit_adapters.opcua.config`; the adapter, the only module that imports
asyncua, is `retrofit_adapters.opcua.adapter` (reached through `retrofit_adapters.registry`).
This package imports neither, so that loading the gateway's config never loads asyncua.
"""
