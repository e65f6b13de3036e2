"""The built-in formats, registered in ``converters.registry.registry`` on import."""

from __future__ import annotations

from ..plugins import Format, registry
from .dcp import DcpFormat
from .msgpack_ import MsgpackFormat
from .onnx_ import OnnxFormat
from .pt import PtFormat
from .safetensors_ import SafetensorsFormat

BUILTIN_FORMATS: tuple[Format, ...] = (PtFormat(), SafetensorsFormat(), MsgpackFormat(), OnnxFormat(), DcpFormat())

for _fmt in BUILTIN_FORMATS:
    registry.register(_fmt, replace=True)
