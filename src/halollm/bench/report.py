"""Where benchmark results go, and what machine and command produced them."""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        mem = round(pages / 2**30, 1)
    except (ValueError, OSError):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": mem,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "kernel": platform.release(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def command_line() -> str:
    return "halo " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def publish(out_dir: Path, name: str, data: dict[str, Any], lines: list[str],
            as_json: bool) -> None:
    """Write the results files, then show them: the JSON, or the markdown table."""
    md = write_results(out_dir, name, data, "\n".join(lines))
    if as_json:
        print(json.dumps(data))
    else:
        print("\n".join(lines[4:]))
        print(f"written: {md}", file=sys.stderr)


def write_results(out_dir: Path, name: str, data: dict[str, Any], markdown: str) -> Path:
    """Write NAME.json and NAME.md; returns the markdown path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    data = {"machine": machine(), "command": command_line(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), **data}
    (out_dir / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")
    md = out_dir / f"{name}.md"
    m = data["machine"]
    header = (f"Machine: {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads, "
              f"{m['cpu_capability']}), {m['memory_gib']} GiB, Python {m['python']}, torch "
              f"{m['torch']}, kernel {m['kernel']}.  \nCommand: `{data['command']}`  \n"
              f"Date: {data['date']}\n\n")
    md.write_text(markdown.replace("{header}", header))
    return md


def stage_printer(bench: str) -> Callable[[str], None]:
    """Progress lines on stderr, `[bench NAME] …`."""
    def say(message: str) -> None:
        print(f"[bench {bench}] {message}", file=sys.stderr, flush=True)
    return say


def require_testbed(bench: str) -> None:
    """HaloError unless the kernel testbed can run here (root, ip, nft)."""
    from halollm.errors import HaloError
    from halollm.testbed.system import unavailable

    why = unavailable()
    if why:
        raise HaloError(f"halo bench {bench} needs the kernel testbed: {why}")
