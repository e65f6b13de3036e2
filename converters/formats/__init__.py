"""The built-in formats: one module or package each, exporting one ``FORMAT`` object.

They are registered here by name and imported only when a job needs them (start-up stays fast).
A new format is one module beside these, its tests and its spec in ``schemas/``; see the README's
"Adding a format".
"""

from __future__ import annotations

from ..core.registry import registry

# Name -> module, in the order of `sdconvert formats`, of sniffing and of matching suffixes (the
# most common first: resolving `x.safetensors` imports only the safetensors format).
BUILTIN_MODULES: dict[str, str] = {
    "safetensors": "converters.formats.safetensors",
    "pt": "converters.formats.pt",
    "msgpack": "converters.formats.msgpack",
    "onnx": "converters.formats.onnx",
    "dcp": "converters.formats.dcp",
    "gguf": "converters.formats.gguf",
    "npz": "converters.formats.npz",
}

for _name, _module in BUILTIN_MODULES.items():
    registry.register_module(_name, _module)
