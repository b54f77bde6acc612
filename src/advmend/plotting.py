"""matplotlib (from the `plot` extra) for every PNG advmend writes: one import rule, one atomic save."""

from __future__ import annotations

from pathlib import Path

from advmend.errors import ConfigError
from advmend.io import atomic_write_bytes


def pyplot(purpose: str):
    """`matplotlib.pyplot` on the file-only Agg backend; a ConfigError naming `purpose` when missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError(f"{purpose} needs matplotlib: pip install 'advmend[plot]'") from None
    return plt


def save_png(fig, path: str | Path, *, dpi: int = 120) -> Path:
    """Write `fig` to the PNG `path` atomically (never a half-written file) and close it."""
    from matplotlib import pyplot as plt  # lazy: an optional extra

    path = Path(path)
    try:
        atomic_write_bytes(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
    except OSError as e:
        raise ConfigError(f"cannot write {path} ({e.strerror or e}); choose another output path") from None
    finally:
        plt.close(fig)
    return path
