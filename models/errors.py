"""The errors of the model tooling, under the project's root error.

FogmeshError (gateway.errors)
└── ModelError            anything the model tooling refuses or cannot do
    ├── ModelFormatError  a .tflite file that is not a supported int8 dense network
    ├── BlobError         a firmware blob with a wrong magic, version, length or CRC
    └── ParityError       the parity run could not run (no MicroPython, a runner crash)
"""

from __future__ import annotations

from gateway.errors import FogmeshError

__all__ = ["BlobError", "ModelError", "ModelFormatError", "ParityError"]


class ModelError(FogmeshError):
    pass


class ModelFormatError(ModelError):
    pass


class BlobError(ModelError):
    pass


class ParityError(ModelError):
    pass
