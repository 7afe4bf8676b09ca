"""GPU topology from NVML: which GPUs exist and how each pair is connected.

``probe()`` never raises for a missing driver: it returns a ``Topology`` whose ``status`` says why
nothing was found, so callers (``python -m interlace env``, the planner) can print it plainly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

# nvidia-ml-py 13.615.71 defines NVML_P2P_CAPS_INDEX_READ as the tuple (0,): use the values.
P2P_READ, P2P_NVLINK, P2P_STATUS_OK = 0, 2, 0
# nvmlDeviceGetTopologyCommonAncestor levels, named as `nvidia-smi topo -m` names them.
PATHS = {0: "X", 10: "PIX", 20: "PXB", 30: "PHB", 40: "NODE", 50: "SYS"}


@dataclass
class GPU:
    index: int
    name: str
    memory_bytes: int
    bus_id: str
    compute_capability: str
    nvlinks_active: int
    # The card as found when probed (a benchmark's envelope: before it runs): what caps its clocks.
    # None where the driver does not say.
    state: dict[str, int | None] = field(default_factory=dict)


@dataclass
class Link:
    """How GPU ``a`` reaches GPU ``b``: NVLink count, PCIe path class, and P2P capabilities."""

    a: int
    b: int
    nvlinks: int
    path: str
    p2p_read: bool
    p2p_nvlink: bool

    @property
    def label(self) -> str:
        return f"NV{self.nvlinks}" if self.nvlinks else self.path


@dataclass
class Topology:
    status: str
    driver: str | None = None
    cuda_driver: str | None = None
    gpus: list[GPU] = field(default_factory=list)
    links: list[Link] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["matrix"] = self.matrix()
        return out

    def matrix(self) -> list[list[str]]:
        """``nvidia-smi topo -m`` style labels: ``X`` on the diagonal, ``NV<n>`` or the PCIe path."""
        n = len(self.gpus)
        grid = [["X" if i == j else "?" for j in range(n)] for i in range(n)]
        for link in self.links:
            grid[link.a][link.b] = link.label
        return grid


def probe(nvml: Any = None) -> Topology:
    """Read the topology through NVML (``pynvml`` unless another binding is given)."""
    if nvml is None:
        try:
            import pynvml as nvml
        except ImportError:
            return Topology(status="no GPU information: nvidia-ml-py is not installed")
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as error:
        return Topology(status=f"no NVIDIA driver found (NVML: {error})")
    try:
        return _read(nvml)
    finally:
        nvml.nvmlShutdown()


def _read(nvml: Any) -> Topology:
    handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
    bus_ids = [_text(nvml.nvmlDeviceGetPciInfo(h).busId) for h in handles]
    peers = [_nvlink_peers(nvml, h) for h in handles]
    gpus = [
        GPU(
            index=i,
            name=_text(nvml.nvmlDeviceGetName(h)),
            memory_bytes=int(nvml.nvmlDeviceGetMemoryInfo(h).total),
            bus_id=bus_ids[i],
            compute_capability="%d.%d" % tuple(nvml.nvmlDeviceGetCudaComputeCapability(h)),
            nvlinks_active=len(peers[i]),
            state=_state(nvml, h),
        )
        for i, h in enumerate(handles)
    ]
    links = [
        _link(nvml, handles, i, j, peers[i].count(_bus_key(bus_ids[j])))
        for i in range(len(handles))
        for j in range(len(handles))
        if i != j
    ]
    return Topology(
        status=f"{len(gpus)} GPU(s) found",
        driver=_text(nvml.nvmlSystemGetDriverVersion()),
        cuda_driver=_cuda_version(nvml.nvmlSystemGetCudaDriverVersion_v2()),
        gpus=gpus,
        links=links,
    )


def _state(nvml: Any, handle: Any) -> dict[str, int | None]:
    """Clocks (MHz, now and at most), power limit (W), temperature (C), and the driver's reasons
    for holding clocks down now (a bit mask: ``nvmlClocksEventReason*``; 0 or idle are fine)."""
    def ask(name: str, *args: Any) -> int | None:
        try:
            return int(getattr(nvml, name)(handle, *args))
        except (AttributeError, nvml.NVMLError):  # older bindings, or not on this GPU
            return None

    sm, mem = getattr(nvml, "NVML_CLOCK_SM", 1), getattr(nvml, "NVML_CLOCK_MEM", 2)
    power = ask("nvmlDeviceGetPowerManagementLimit")
    reasons = ask("nvmlDeviceGetCurrentClocksEventReasons")
    return {"sm_clock_mhz": ask("nvmlDeviceGetClockInfo", sm), "sm_clock_max_mhz": ask("nvmlDeviceGetMaxClockInfo", sm),
            "mem_clock_mhz": ask("nvmlDeviceGetClockInfo", mem), "mem_clock_max_mhz": ask("nvmlDeviceGetMaxClockInfo", mem),
            "power_limit_w": None if power is None else power // 1000, "temperature_c": ask("nvmlDeviceGetTemperature", getattr(nvml, "NVML_TEMPERATURE_GPU", 0)),
            "clock_event_reasons": reasons if reasons is not None else ask("nvmlDeviceGetCurrentClocksThrottleReasons")}  # fmt: skip


def _nvlink_peers(nvml: Any, handle: Any) -> list[str]:
    """Bus ids at the far end of each active NVLink (a peer appears once per link)."""
    out = []
    for link in range(nvml.NVML_NVLINK_MAX_LINKS):
        try:
            if nvml.nvmlDeviceGetNvLinkState(handle, link) != nvml.NVML_FEATURE_ENABLED:
                continue
            out.append(_bus_key(_text(nvml.nvmlDeviceGetNvLinkRemotePciInfo(handle, link).busId)))
        except nvml.NVMLError:  # link absent or NVLink unsupported on this GPU
            continue
    return out


def _link(nvml: Any, handles: list, i: int, j: int, nvlinks: int) -> Link:
    level = nvml.nvmlDeviceGetTopologyCommonAncestor(handles[i], handles[j])
    status = nvml.nvmlDeviceGetP2PStatus
    return Link(
        a=i,
        b=j,
        nvlinks=nvlinks,
        path=PATHS.get(int(level), f"level-{level}"),
        p2p_read=status(handles[i], handles[j], P2P_READ) == P2P_STATUS_OK,
        p2p_nvlink=status(handles[i], handles[j], P2P_NVLINK) == P2P_STATUS_OK,
    )


def _bus_key(bus_id: str) -> str:
    """Bus ids compare case-insensitively; NVML pads the domain to 4 or 8 hex digits."""
    return bus_id.lower().split(":", 1)[-1] if bus_id.count(":") == 2 else bus_id.lower()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _cuda_version(code: int) -> str:
    return f"{code // 1000}.{code % 1000 // 10}"
