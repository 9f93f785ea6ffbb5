"""What the numbers were measured on: CPU, kernel, tool versions."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import time
from typing import Any


def _first_line(*args: str) -> str:
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "not installed"
    out = (done.stdout or done.stderr).strip().splitlines()
    return out[0].strip() if out else "unknown"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _bcc_version() -> str:
    try:
        import bcc
    except ImportError:
        return "not installed"
    return str(getattr(bcc, "__version__", "unknown"))


def _os_release() -> str:
    try:
        with open("/etc/os-release", encoding="utf-8") as f:
            found = re.search(r'^PRETTY_NAME="?([^"\n]*)', f.read(), re.M)
    except OSError:
        return "unknown"
    return found.group(1) if found else "unknown"


def describe() -> dict[str, Any]:
    load1, load5, _ = os.getloadavg()
    return {
        "hostname": platform.node(),
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "os": _os_release(),
        "load_average": [round(load1, 2), round(load5, 2)],
        "virtualization": _first_line("systemd-detect-virt") if os.path.exists("/usr/bin/systemd-detect-virt")
        else _virtualization(),
        "versions": {
            "python": platform.python_version(),
            "bcc": _bcc_version(),
            "iptables": _first_line("iptables", "-V"),
            "nft": _first_line("nft", "-v"),
            "ipset": _first_line("ipset", "-v"),
            "trafgen": _first_line("trafgen", "-v"),
            "iperf3": _first_line("iperf3", "-v"),
            "xdp-filter": _first_line("xdp-filter", "load", "--version"),
        },
        "taken_at": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def _virtualization() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            return "virtual machine (hypervisor flag)" if " hypervisor" in f.read() else "bare metal?"
    except OSError:
        return "unknown"
