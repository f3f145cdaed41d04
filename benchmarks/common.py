"""What every benchmark prints first: the machine it ran on."""
from __future__ import annotations

import os
import platform


def machine() -> str:
    processor = platform.processor() or "unknown cpu"
    return (f"{platform.machine()} {os.cpu_count()} cores ({processor}), {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}")
