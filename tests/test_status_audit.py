"""Status audit (issue 12 item 5): every status vsmtrace can return is a TLFS status.

The TLFS set is the Hypervisor TLFS v6.0b's Appendix B ("Hypercall Status Code Reference"),
plus HV_STATUS_INVALID_VTL_STATE, which the TLFS return tables of the VSM calls name
(HvCallModifyVtlProtectionMask, HvCallEnablePartitionVtl, HvCallEnableVpVtl,
HvCallStartVirtualProcessor, ...) without Appendix B giving its value (0x51, the Windows
headers' value). Appendix B prints INSUFFICIENT_BUFFERS as 0x0033, the value of
INSUFFICIENT_BUFFER; its real value is 0x0013 (docs/vsm.md, "Statuses").

A handler's status reaches the guest only as an ``HvStatus`` (the dispatcher converts it and
refuses anything else), so the audit is: ``HvStatus`` holds TLFS statuses only, every status
named anywhere in the VMM is an ``HvStatus`` member, and no handler passes a bare number.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from vsmtrace.vmm.hyperv.hvdef import HvStatus

ROOT = Path(__file__).resolve().parent.parent

#: TLFS v6.0b Appendix B, in its order (0x0001, 0x000F and 0x0010 are "Reserved" there).
TLFS_APPENDIX_B: dict[str, int] = {
    "HV_STATUS_SUCCESS": 0x0000,
    "HV_STATUS_INVALID_HYPERCALL_CODE": 0x0002,
    "HV_STATUS_INVALID_HYPERCALL_INPUT": 0x0003,
    "HV_STATUS_INVALID_ALIGNMENT": 0x0004,
    "HV_STATUS_INVALID_PARAMETER": 0x0005,
    "HV_STATUS_ACCESS_DENIED": 0x0006,
    "HV_STATUS_INVALID_PARTITION_STATE": 0x0007,
    "HV_STATUS_OPERATION_DENIED": 0x0008,
    "HV_STATUS_UNKNOWN_PROPERTY": 0x0009,
    "HV_STATUS_PROPERTY_VALUE_OUT_OF_RANGE": 0x000A,
    "HV_STATUS_INSUFFICIENT_MEMORY": 0x000B,
    "HV_STATUS_PARTITION_TOO_DEEP": 0x000C,
    "HV_STATUS_INVALID_PARTITION_ID": 0x000D,
    "HV_STATUS_INVALID_VP_INDEX": 0x000E,
    "HV_STATUS_INVALID_PORT_ID": 0x0011,
    "HV_STATUS_INVALID_CONNECTION_ID": 0x0012,
    "HV_STATUS_INSUFFICIENT_BUFFERS": 0x0013,  # printed 0x0033 (misprint)
    "HV_STATUS_NOT_ACKNOWLEDGED": 0x0014,
    "HV_STATUS_INVALID_VP_STATE": 0x0015,
    "HV_STATUS_ACKNOWLEDGED": 0x0016,
    "HV_STATUS_INVALID_SAVE_RESTORE_STATE": 0x0017,
    "HV_STATUS_INVALID_SYNIC_STATE": 0x0018,
    "HV_STATUS_OBJECT_IN_USE": 0x0019,
    "HV_STATUS_INVALID_PROXIMITY_DOMAIN_INFO": 0x001A,
    "HV_STATUS_NO_DATA": 0x001B,
    "HV_STATUS_INACTIVE": 0x001C,
    "HV_STATUS_NO_RESOURCES": 0x001D,
    "HV_STATUS_FEATURE_UNAVAILABLE": 0x001E,
    "HV_STATUS_PARTIAL_PACKET": 0x001F,
    "HV_STATUS_PROCESSOR_FEATURE_NOT_SUPPORTED": 0x0020,
    "HV_STATUS_PROCESSOR_CACHE_LINE_FLUSH_SIZE_INCOMPATIBLE": 0x0030,
    "HV_STATUS_INSUFFICIENT_BUFFER": 0x0033,
    "HV_STATUS_INCOMPATIBLE_PROCESSOR": 0x0037,
    "HV_STATUS_INSUFFICIENT_DEVICE_DOMAINS": 0x0038,
    "HV_STATUS_CPUID_FEATURE_VALIDATION_ERROR": 0x003C,
    "HV_STATUS_CPUID_XSAVE_FEATURE_VALIDATION_ERROR": 0x003D,
    "HV_STATUS_PROCESSOR_STARTUP_TIMEOUT": 0x003E,
    "HV_STATUS_SMX_ENABLED": 0x003F,
    "HV_STATUS_INVALID_LP_INDEX": 0x0041,
    "HV_STATUS_INVALID_REGISTER_VALUE": 0x0050,
    "HV_STATUS_NX_NOT_DETECTED": 0x0055,
    "HV_STATUS_INVALID_DEVICE_ID": 0x0057,
    "HV_STATUS_INVALID_DEVICE_STATE": 0x0058,
    "HV_STATUS_PENDING_PAGE_REQUESTS": 0x0059,
    "HV_STATUS_PAGE_REQUEST_INVALID": 0x0060,
    "HV_STATUS_OPERATION_FAILED": 0x0071,
    "HV_STATUS_NOT_ALLOWED_WITH_NESTED_VIRT_ACTIVE": 0x0072,
}
#: Named in TLFS return tables, value from the Windows headers.
TLFS_RETURN_TABLES: dict[str, int] = {"HV_STATUS_INVALID_VTL_STATE": 0x0051}
TLFS_STATUSES = {**TLFS_APPENDIX_B, **TLFS_RETURN_TABLES}

STATUS_NAME = re.compile(r"\bHV_STATUS_[A-Z0-9_]+\b")


def _vmm_sources() -> list[Path]:
    return sorted(p for folder in ("vmm", "replayer", "recorder") for p in (ROOT / folder).rglob("*.py"))


def test_hvstatus_holds_only_tlfs_statuses() -> None:
    members = {m.name: int(m) for m in HvStatus}
    foreign = {name: hex(v) for name, v in members.items() if TLFS_STATUSES.get(name) != v}
    assert not foreign, f"HvStatus has statuses the TLFS does not define: {foreign}"
    assert "HV_STATUS_SUCCESS" in members and len(set(members.values())) == len(members)


def test_every_status_the_vmm_names_is_a_tlfs_status() -> None:
    named: dict[str, set[str]] = {}
    for path in _vmm_sources():
        for name in STATUS_NAME.findall(path.read_text()):
            named.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    assert "HV_STATUS_INVALID_PARAMETER" in named  # the scan sees the handlers
    foreign = {name: sorted(files) for name, files in named.items() if name not in TLFS_STATUSES}
    assert not foreign, f"statuses outside the TLFS: {foreign}"


def _bare_status_calls(tree: ast.AST) -> list[int]:
    """Line numbers of HypercallResult(...)/HandlerError(...) given a number as status."""
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not node.args:
            continue
        fn = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
        if fn in ("HypercallResult", "HandlerError") and isinstance(node.args[0], ast.Constant):
            out.append(node.lineno)
    return out


def test_no_handler_returns_a_bare_number() -> None:
    bare = {}
    for path in _vmm_sources():
        lines = _bare_status_calls(ast.parse(path.read_text()))
        if lines:
            bare[str(path.relative_to(ROOT))] = lines
    assert not bare, f"statuses given as numbers (use HvStatus): {bare}"


@pytest.mark.parametrize("value", [0x0001, 0x000F, 0x0010, 0x0078, 0x0086, 0x0087])
def test_non_tlfs_codes_are_refused(value: int) -> None:
    """Reserved or OpenVMM-only codes cannot become an HvStatus, so the dispatcher refuses them."""
    with pytest.raises(ValueError):
        HvStatus(value)
