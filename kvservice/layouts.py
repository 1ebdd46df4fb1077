"""Named KV-cache layouts, and the parser behind the CLI's ``--layout NAME|L,H,D,dtype``.

A name fixes the model shape (layers, KV heads, head size, dtype); the block size is
always chosen separately, so one named shape serves any block size.
"""

from __future__ import annotations

from kvservice.core.layout import DTYPE_SIZES, Layout

DEFAULT_BLOCK_SIZE = 16

# name -> (num_layers, num_kv_heads, head_dim, dtype)
LAYOUT_SHAPES: dict[str, tuple[int, int, int, str]] = {
    # For tests and CPU runs: a few KiB per block.
    "tiny": (2, 2, 16, "float32"),
    # The service benchmark's layout: big enough to be honest, small enough for a CPU.
    "small": (4, 4, 64, "float32"),
    # Llama-shaped ~1.1B model (hidden 2048, 32 heads -> head_dim 64).
    "llama-1b": (16, 8, 64, "bfloat16"),
    "llama3-8b": (32, 8, 128, "bfloat16"),
    "llama3-70b": (80, 8, 128, "bfloat16"),
}


def layout_names() -> list[str]:
    return sorted(LAYOUT_SHAPES)


def get_layout(name: str, *, block_size: int = DEFAULT_BLOCK_SIZE) -> Layout:
    """The named layout with the given block size; ValueError names the known ones."""
    try:
        num_layers, num_kv_heads, head_dim, dtype = LAYOUT_SHAPES[name]
    except KeyError:
        raise ValueError(
            f"unknown layout {name!r}; known: {', '.join(layout_names())} or L,H,D,dtype"
        ) from None
    return Layout(num_layers, num_kv_heads, head_dim, dtype, block_size)


def parse_layout(spec: str | Layout, *, block_size: int = DEFAULT_BLOCK_SIZE) -> Layout:
    """A Layout from a name ("tiny") or "L,H,D[,dtype]" ("32,8,128,bfloat16").

    A Layout passed in is returned unchanged (its own block size wins).
    """
    if isinstance(spec, Layout):
        return spec
    text = spec.strip()
    if "," not in text:
        return get_layout(text, block_size=block_size)
    parts = [p.strip() for p in text.split(",")]
    if len(parts) not in (3, 4):
        raise ValueError(f"layout {spec!r}: expected L,H,D or L,H,D,dtype")
    try:
        num_layers, num_kv_heads, head_dim = (int(p) for p in parts[:3])
    except ValueError:
        raise ValueError(f"layout {spec!r}: L, H and D must be integers") from None
    dtype = parts[3] if len(parts) == 4 else "bfloat16"
    if dtype not in DTYPE_SIZES:
        raise ValueError(f"layout {spec!r}: dtype must be one of {sorted(DTYPE_SIZES)}")
    return Layout(num_layers, num_kv_heads, head_dim, dtype, block_size)
