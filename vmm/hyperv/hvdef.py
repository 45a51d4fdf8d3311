"""Every Hyper-V number the project uses: codes, statuses, MSRs, CPUID bits, registers, layouts.

This is the one place Hyper-V numbers live (as OpenVMM's ``hvdef`` crate): every other
module imports names from here. Values come from the Hypervisor Top-Level Functional
Specification (TLFS); where sources disagree the choice is noted next to the definition.
Only the TLFS's numbers live here: vsmtrace's own choices (the hypercall trap port, the
loopback connections, the partition ID it reports, caches) live with the code that owns
them (docs/architecture.md, "Layers").

Structures are ``struct``-based dataclasses: ``pack() -> bytes`` and ``unpack(data)``
(class method), with ``SIZE`` the packed size. All layouts are little endian.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Self

# ---------------------------------------------------------------------------------------------
# Basic sizes and special values
# ---------------------------------------------------------------------------------------------

HV_PAGE_SIZE = 4096
HV_PAGE_SHIFT = 12
HV_PAGE_MASK = ~(HV_PAGE_SIZE - 1) & 0xFFFF_FFFF_FFFF_FFFF
HV_HYPERCALL_ALIGNMENT = 8  # input/output GPAs must be 8-byte aligned
HV_X64_REGISTER_PAIR_SIZE = 16  # fast-call register pair (RDX:R8 or one XMM)
HV_X64_FAST_INPUT_MAX = 112  # RDX:R8 + XMM0..XMM5
HV_X64_FAST_XMM_COUNT = 6  # XMM0..XMM5 carry fast input/output
HV_X86_FAST_INPUT_MAX = 16  # 32-bit callers have one pair (EBX:ECX, EDI:ESI)

HV_PARTITION_ID_SELF = 0xFFFF_FFFF_FFFF_FFFF
HV_VP_INDEX_SELF = 0xFFFF_FFFE
HV_ANY_VP = 0xFFFF_FFFF

HV_MAX_VTL_COUNT = 16  # VTL numbers are 4 bits

HV_REFERENCE_TIME_HZ = 10_000_000  # TIME_REF_COUNT ticks per second (100 ns units)
HV_NS_PER_REFERENCE_TICK = 100

HV_CONNECTION_ID_MASK = 0x00FF_FFFF


class X86Exception(enum.IntEnum):
    """x86 exception vectors the Hyper-V layer injects."""

    UD = 6
    GP = 13


# ---------------------------------------------------------------------------------------------
# Hypercall input value (control word) and result value
# ---------------------------------------------------------------------------------------------


class HypercallControlBits:
    """Bit positions/masks of the 64-bit hypercall input value [TLFS hypercall-interface]."""

    CODE_MASK = 0xFFFF
    FAST = 1 << 16
    VAR_HEADER_SHIFT = 17
    VAR_HEADER_MASK = 0x3FF  # 10 bits, 26:17 (QEMU's 9-bit mask is wrong, vsm-facts §1.1)
    NESTED = 1 << 31
    REP_COUNT_SHIFT = 32
    REP_COUNT_MASK = 0xFFF
    REP_START_SHIFT = 48
    REP_START_MASK = 0xFFF
    RESERVED = (0xF << 27) | (0xF << 44) | (0xF << 60)


class HypercallResultBits:
    """Bit positions of the 64-bit hypercall result value."""

    STATUS_MASK = 0xFFFF
    REPS_COMPLETED_SHIFT = 32
    REPS_COMPLETED_MASK = 0xFFF


@dataclass(frozen=True)
class HypercallControl:
    """Decoded hypercall input value."""

    code: int
    fast: bool
    var_header_qwords: int
    nested: bool
    rep_count: int
    rep_start: int
    reserved: int

    @classmethod
    def decode(cls, value: int) -> HypercallControl:
        """Decode a hypercall input value (RCX)."""
        b = HypercallControlBits
        return cls(
            code=value & b.CODE_MASK,
            fast=bool(value & b.FAST),
            var_header_qwords=(value >> b.VAR_HEADER_SHIFT) & b.VAR_HEADER_MASK,
            nested=bool(value & b.NESTED),
            rep_count=(value >> b.REP_COUNT_SHIFT) & b.REP_COUNT_MASK,
            rep_start=(value >> b.REP_START_SHIFT) & b.REP_START_MASK,
            reserved=value & b.RESERVED,
        )

    @staticmethod
    def encode(
        code: int, *, fast: bool = False, var_header_qwords: int = 0, rep_count: int = 0, rep_start: int = 0
    ) -> int:
        b = HypercallControlBits
        return (
            (code & b.CODE_MASK)
            | (b.FAST if fast else 0)
            | ((var_header_qwords & b.VAR_HEADER_MASK) << b.VAR_HEADER_SHIFT)
            | ((rep_count & b.REP_COUNT_MASK) << b.REP_COUNT_SHIFT)
            | ((rep_start & b.REP_START_MASK) << b.REP_START_SHIFT)
        )

    @staticmethod
    def with_rep_start(value: int, rep_start: int) -> int:
        """The same input value with a new rep start index (rep continuation)."""
        b = HypercallControlBits
        value &= ~(b.REP_START_MASK << b.REP_START_SHIFT)
        return value | ((rep_start & b.REP_START_MASK) << b.REP_START_SHIFT)


def hypercall_result(status: int, reps_completed: int = 0) -> int:
    """The 64-bit result value returned in RAX (x64) / EDX:EAX (x86)."""
    b = HypercallResultBits
    return (status & b.STATUS_MASK) | ((reps_completed & b.REPS_COMPLETED_MASK) << b.REPS_COMPLETED_SHIFT)


class HypercallCode(enum.IntEnum):
    """Hypercall call codes [TLFS App. A; OpenVMM hvdef]."""

    HvCallSwitchVirtualAddressSpace = 0x0001
    HvCallFlushVirtualAddressSpace = 0x0002
    HvCallFlushVirtualAddressList = 0x0003
    HvCallGetLogicalProcessorRunTime = 0x0004
    HvCallNotifyLongSpinWait = 0x0008
    HvCallParkedVirtualProcessors = 0x0009
    HvCallSendSyntheticClusterIpi = 0x000B
    HvCallModifyVtlProtectionMask = 0x000C
    HvCallEnablePartitionVtl = 0x000D
    HvCallDisablePartitionVtl = 0x000E
    HvCallEnableVpVtl = 0x000F
    HvCallDisableVpVtl = 0x0010
    HvCallVtlCall = 0x0011
    HvCallVtlReturn = 0x0012
    HvCallFlushVirtualAddressSpaceEx = 0x0013
    HvCallFlushVirtualAddressListEx = 0x0014
    HvCallSendSyntheticClusterIpiEx = 0x0015
    HvCallCreatePartition = 0x0040
    HvCallInitializePartition = 0x0041
    HvCallFinalizePartition = 0x0042
    HvCallDeletePartition = 0x0043
    HvCallGetPartitionProperty = 0x0044
    HvCallSetPartitionProperty = 0x0045
    HvCallGetPartitionId = 0x0046
    HvCallGetNextChildPartition = 0x0047
    HvCallDepositMemory = 0x0048
    HvCallWithdrawMemory = 0x0049
    HvCallGetMemoryBalance = 0x004A
    HvCallMapGpaPages = 0x004B
    HvCallUnmapGpaPages = 0x004C
    HvCallInstallIntercept = 0x004D
    HvCallCreateVp = 0x004E
    HvCallDeleteVp = 0x004F
    HvCallGetVpRegisters = 0x0050
    HvCallSetVpRegisters = 0x0051
    HvCallTranslateVirtualAddress = 0x0052
    HvCallReadGpa = 0x0053
    HvCallWriteGpa = 0x0054
    HvCallClearVirtualInterrupt = 0x0056
    HvCallDeletePort = 0x0058
    HvCallConnectPort = 0x0059
    HvCallGetPortProperty = 0x005A
    HvCallDisconnectPort = 0x005B
    HvCallPostMessage = 0x005C
    HvCallSignalEvent = 0x005D
    HvCallSavePartitionState = 0x005E
    HvCallRestorePartitionState = 0x005F
    HvCallInitializeEventLogBufferGroup = 0x0060
    HvCallCreatePort = 0x0095
    HvCallPostDebugData = 0x0069
    HvCallRetrieveDebugData = 0x006A
    HvCallResetDebugSession = 0x006B
    HvCallMapStatsPage = 0x006C
    HvCallUnmapStatsPage = 0x006D
    HvCallOutputDebugCharacter = 0x0071
    HvCallGetSystemProperty = 0x007B
    HvCallRetargetDeviceInterrupt = 0x007E
    HvCallAssertVirtualInterrupt = 0x0094
    HvCallStartVirtualProcessor = 0x0099
    HvCallGetVpIndexFromApicId = 0x009A
    HvCallTranslateVirtualAddressEx = 0x00AC
    HvCallCheckForIoIntercept = 0x00AD
    HvCallFlushGuestPhysicalAddressSpace = 0x00AF
    HvCallFlushGuestPhysicalAddressList = 0x00B0
    HvCallSignalEventDirect = 0x00C0
    HvCallPostMessageDirect = 0x00C1
    HvExtCallQueryCapabilities = 0x8001
    HvExtCallGetBootZeroedMemory = 0x8002


class HvStatus(enum.IntEnum):
    """HV_STATUS codes: the TLFS v6.0b Appendix B table, plus INVALID_VTL_STATE (named in the
    TLFS return tables of the VSM calls; value from the Windows headers via OpenVMM).
    INSUFFICIENT_BUFFERS is 0x13 (Appendix B misprints 0x33, vsm-facts §6.9). Codes other
    hypervisors added (OpenVMM's 0x86 VTL_ALREADY_ENABLED, 0x87 UNKNOWN_REGISTER_NAME, ...)
    are deliberately absent: vsmtrace returns only TLFS statuses (docs/vsm.md)."""

    HV_STATUS_SUCCESS = 0x0000
    HV_STATUS_INVALID_HYPERCALL_CODE = 0x0002
    HV_STATUS_INVALID_HYPERCALL_INPUT = 0x0003
    HV_STATUS_INVALID_ALIGNMENT = 0x0004
    HV_STATUS_INVALID_PARAMETER = 0x0005
    HV_STATUS_ACCESS_DENIED = 0x0006
    HV_STATUS_INVALID_PARTITION_STATE = 0x0007
    HV_STATUS_OPERATION_DENIED = 0x0008
    HV_STATUS_UNKNOWN_PROPERTY = 0x0009
    HV_STATUS_PROPERTY_VALUE_OUT_OF_RANGE = 0x000A
    HV_STATUS_INSUFFICIENT_MEMORY = 0x000B
    HV_STATUS_PARTITION_TOO_DEEP = 0x000C
    HV_STATUS_INVALID_PARTITION_ID = 0x000D
    HV_STATUS_INVALID_VP_INDEX = 0x000E
    HV_STATUS_INVALID_PORT_ID = 0x0011
    HV_STATUS_INVALID_CONNECTION_ID = 0x0012
    HV_STATUS_INSUFFICIENT_BUFFERS = 0x0013
    HV_STATUS_NOT_ACKNOWLEDGED = 0x0014
    HV_STATUS_INVALID_VP_STATE = 0x0015
    HV_STATUS_ACKNOWLEDGED = 0x0016
    HV_STATUS_INVALID_SAVE_RESTORE_STATE = 0x0017
    HV_STATUS_INVALID_SYNIC_STATE = 0x0018
    HV_STATUS_OBJECT_IN_USE = 0x0019
    HV_STATUS_INVALID_PROXIMITY_DOMAIN_INFO = 0x001A
    HV_STATUS_NO_DATA = 0x001B
    HV_STATUS_INACTIVE = 0x001C
    HV_STATUS_NO_RESOURCES = 0x001D
    HV_STATUS_FEATURE_UNAVAILABLE = 0x001E
    HV_STATUS_PARTIAL_PACKET = 0x001F
    HV_STATUS_PROCESSOR_FEATURE_NOT_SUPPORTED = 0x0020
    HV_STATUS_PROCESSOR_CACHE_LINE_FLUSH_SIZE_INCOMPATIBLE = 0x0030
    HV_STATUS_INSUFFICIENT_BUFFER = 0x0033
    HV_STATUS_INCOMPATIBLE_PROCESSOR = 0x0037
    HV_STATUS_INSUFFICIENT_DEVICE_DOMAINS = 0x0038
    HV_STATUS_CPUID_FEATURE_VALIDATION_ERROR = 0x003C
    HV_STATUS_CPUID_XSAVE_FEATURE_VALIDATION_ERROR = 0x003D
    HV_STATUS_PROCESSOR_STARTUP_TIMEOUT = 0x003E
    HV_STATUS_SMX_ENABLED = 0x003F
    HV_STATUS_INVALID_LP_INDEX = 0x0041
    HV_STATUS_INVALID_REGISTER_VALUE = 0x0050
    HV_STATUS_INVALID_VTL_STATE = 0x0051
    HV_STATUS_NX_NOT_DETECTED = 0x0055
    HV_STATUS_INVALID_DEVICE_ID = 0x0057
    HV_STATUS_INVALID_DEVICE_STATE = 0x0058
    HV_STATUS_PENDING_PAGE_REQUESTS = 0x0059
    HV_STATUS_PAGE_REQUEST_INVALID = 0x0060
    HV_STATUS_OPERATION_FAILED = 0x0071
    HV_STATUS_NOT_ALLOWED_WITH_NESTED_VIRT_ACTIVE = 0x0072


# ---------------------------------------------------------------------------------------------
# Synthetic MSRs
# ---------------------------------------------------------------------------------------------


class HvMsr(enum.IntEnum):
    """Hyper-V synthetic MSR indices [TLFS; vsm-facts §1.7]."""

    HV_X64_MSR_GUEST_OS_ID = 0x40000000
    HV_X64_MSR_HYPERCALL = 0x40000001
    HV_X64_MSR_VP_INDEX = 0x40000002
    HV_X64_MSR_RESET = 0x40000003
    HV_X64_MSR_VP_RUNTIME = 0x40000010
    HV_X64_MSR_TIME_REF_COUNT = 0x40000020
    HV_X64_MSR_REFERENCE_TSC = 0x40000021
    HV_X64_MSR_TSC_FREQUENCY = 0x40000022
    HV_X64_MSR_APIC_FREQUENCY = 0x40000023
    HV_X64_MSR_NPIEP_CONFIG = 0x40000040
    HV_X64_MSR_EOI = 0x40000070
    HV_X64_MSR_ICR = 0x40000071
    HV_X64_MSR_TPR = 0x40000072
    HV_X64_MSR_VP_ASSIST_PAGE = 0x40000073
    HV_X64_MSR_SCONTROL = 0x40000080
    HV_X64_MSR_SVERSION = 0x40000081
    HV_X64_MSR_SIEFP = 0x40000082
    HV_X64_MSR_SIMP = 0x40000083
    HV_X64_MSR_EOM = 0x40000084
    HV_X64_MSR_SINT0 = 0x40000090
    HV_X64_MSR_SINT1 = 0x40000091
    HV_X64_MSR_SINT2 = 0x40000092
    HV_X64_MSR_SINT3 = 0x40000093
    HV_X64_MSR_SINT4 = 0x40000094
    HV_X64_MSR_SINT5 = 0x40000095
    HV_X64_MSR_SINT6 = 0x40000096
    HV_X64_MSR_SINT7 = 0x40000097
    HV_X64_MSR_SINT8 = 0x40000098
    HV_X64_MSR_SINT9 = 0x40000099
    HV_X64_MSR_SINT10 = 0x4000009A
    HV_X64_MSR_SINT11 = 0x4000009B
    HV_X64_MSR_SINT12 = 0x4000009C
    HV_X64_MSR_SINT13 = 0x4000009D
    HV_X64_MSR_SINT14 = 0x4000009E
    HV_X64_MSR_SINT15 = 0x4000009F
    HV_X64_MSR_STIMER0_CONFIG = 0x400000B0
    HV_X64_MSR_STIMER0_COUNT = 0x400000B1
    HV_X64_MSR_STIMER1_CONFIG = 0x400000B2
    HV_X64_MSR_STIMER1_COUNT = 0x400000B3
    HV_X64_MSR_STIMER2_CONFIG = 0x400000B4
    HV_X64_MSR_STIMER2_COUNT = 0x400000B5
    HV_X64_MSR_STIMER3_CONFIG = 0x400000B6
    HV_X64_MSR_STIMER3_COUNT = 0x400000B7
    HV_X64_MSR_GUEST_IDLE = 0x400000F0
    HV_X64_MSR_CRASH_P0 = 0x40000100
    HV_X64_MSR_CRASH_P1 = 0x40000101
    HV_X64_MSR_CRASH_P2 = 0x40000102
    HV_X64_MSR_CRASH_P3 = 0x40000103
    HV_X64_MSR_CRASH_P4 = 0x40000104
    HV_X64_MSR_CRASH_CTL = 0x40000105
    HV_X64_MSR_STIME_UNHALTED_TIMER_CONFIG = 0x40000114
    HV_X64_MSR_STIME_UNHALTED_TIMER_COUNT = 0x40000115


#: The synthetic MSR range the Hyper-V layer owns (everything else is the machine's).
HV_X64_MSR_RANGE_FIRST = 0x40000000
HV_X64_MSR_RANGE_LAST = 0x400001FF
HV_SYNIC_SINT_COUNT = 16
HV_STIMER_COUNT = 4
HV_STIMER_MSR_STRIDE = 2  # CONFIG, COUNT per timer
HV_CRASH_PARAM_COUNT = 5


class HvHypercallMsr:
    """HV_X64_MSR_HYPERCALL bits: 0 enable, 1 locked, 11:2 RsvdP, 63:12 GPFN."""

    ENABLE = 1 << 0
    LOCKED = 1 << 1
    RSVDP_MASK = 0xFFC
    GPFN_SHIFT = HV_PAGE_SHIFT


class HvOverlayMsr:
    """Layout shared by SIMP, SIEFP, VP_ASSIST_PAGE, REFERENCE_TSC: 0 enable, 11:1 RsvdP, 63:12 GPN."""

    ENABLE = 1 << 0
    RSVDP_MASK = 0xFFE
    GPN_SHIFT = HV_PAGE_SHIFT


class HvScontrol:
    ENABLE = 1 << 0


#: SVERSION reads this (SynIC version 1); writes #GP.
HV_SYNIC_VERSION = 1


class HvSint:
    """SINTx register: 7:0 vector, 16 masked, 17 auto-EOI, 18 polling; other bits RsvdP."""

    VECTOR_MASK = 0xFF
    MASKED = 1 << 16
    AUTO_EOI = 1 << 17
    POLLING = 1 << 18
    RESET_VALUE = MASKED
    FIRST_VALID_VECTOR = 16


class HvStimerConfig:
    """STIMERx_CONFIG: 0 enable, 1 periodic, 2 lazy, 3 auto-enable, 11:4 APIC vector, 12 direct, 19:16 SINTx."""

    ENABLE = 1 << 0
    PERIODIC = 1 << 1
    LAZY = 1 << 2
    AUTO_ENABLE = 1 << 3
    APIC_VECTOR_SHIFT = 4
    APIC_VECTOR_MASK = 0xFF
    DIRECT_MODE = 1 << 12
    SINT_SHIFT = 16
    SINT_MASK = 0xF
    RSVDZ = (0x7 << 13) | (0xFFFF_FFFF_FFF << 20)


class HvCrashCtl(enum.IntFlag):
    """HV_CRASH_CTL_REG_CONTENTS bits (63 notify, 62 message, 61 no crash dump, 60:58 pre-OS id)."""

    CRASH_NOTIFY = 1 << 63
    CRASH_MESSAGE = 1 << 62
    NO_CRASH_DUMP = 1 << 61
    PRE_OS_ID_MASK = 0x7 << 58


HV_CRASH_MESSAGE_MAX = 4096  # bytes of crash message at P3 (length P4)
HV_CRASH_MESSAGE_GPA_PARAM = 3  # CrashMessage: P3 = message GPA
HV_CRASH_MESSAGE_LENGTH_PARAM = 4  # CrashMessage: P4 = message length


class HvResetMsr:
    """HV_X64_MSR_RESET: bit 0 requests a system reset."""

    RESET = 1 << 0


class HvApicMsr:
    """Reserved bits of the APIC access MSRs (EOI: 63:32 RsvdZ; TPR: 63:8 RsvdZ)."""

    EOI_RSVDZ = 0xFFFF_FFFF_0000_0000
    TPR_RSVDZ = 0xFFFF_FFFF_FFFF_FF00


# ---------------------------------------------------------------------------------------------
# CPUID
# ---------------------------------------------------------------------------------------------


class HvCpuidLeaf(enum.IntEnum):
    VENDOR_AND_MAX = 0x40000000
    INTERFACE = 0x40000001
    VERSION = 0x40000002
    FEATURES = 0x40000003
    ENLIGHTENMENT_INFO = 0x40000004
    IMPLEMENTATION_LIMITS = 0x40000005
    HARDWARE_FEATURES = 0x40000006
    CPU_MANAGEMENT_FEATURES = 0x40000007
    SVM_FEATURES = 0x40000008
    NESTED_FEATURES = 0x40000009
    NESTED_OPTIMIZATIONS = 0x4000000A


HV_CPUID_MAX_LEAF = HvCpuidLeaf.NESTED_OPTIMIZATIONS
HV_CPUID_VENDOR = b"Microsoft Hv"  # EBX, ECX, EDX of 0x40000000
HV_CPUID_INTERFACE_SIGNATURE = 0x31237648  # "Hv#1"
#: CPUID.01H:ECX bit 31, the hypervisor-present bit (set by the machine's CPUID policy).
CPUID_1_ECX_HYPERVISOR_PRESENT = 1 << 31
#: 0x40000002 reported version: build 19041, 10.0 (any value works; guests must use features).
HV_VERSION_BUILD = 19041
HV_VERSION_MAJOR = 10
HV_VERSION_MINOR = 0
HV_VERSION_MAJOR_SHIFT = 16
#: 0x40000004 EBX: "never notify on long spin wait".
HV_SPIN_RETRY_NEVER = 0xFFFF_FFFF
#: 0x40000004 EBX default: spins before HvCallNotifyLongSpinWait (the value Hyper-V reports).
HV_DEFAULT_SPIN_RETRIES = 0x1000


class HvPartitionPrivilege(enum.IntFlag):
    """HV_PARTITION_PRIVILEGE_MASK (CPUID 0x40000003 EAX = bits 31:0, EBX = bits 63:32)."""

    ACCESS_VP_RUNTIME_REG = 1 << 0
    ACCESS_PARTITION_REFERENCE_COUNTER = 1 << 1
    ACCESS_SYNIC_REGS = 1 << 2
    ACCESS_SYNTHETIC_TIMER_REGS = 1 << 3
    ACCESS_INTR_CTRL_REGS = 1 << 4
    ACCESS_HYPERCALL_MSRS = 1 << 5
    ACCESS_VP_INDEX = 1 << 6
    ACCESS_RESET_REG = 1 << 7
    ACCESS_STATS_REG = 1 << 8
    ACCESS_PARTITION_REFERENCE_TSC = 1 << 9
    ACCESS_GUEST_IDLE_REG = 1 << 10
    ACCESS_FREQUENCY_REGS = 1 << 11
    ACCESS_REENLIGHTENMENT_CONTROLS = 1 << 13
    CREATE_PARTITIONS = 1 << 32
    ACCESS_PARTITION_ID = 1 << 33
    ACCESS_MEMORY_POOL = 1 << 34
    POST_MESSAGES = 1 << 36
    SIGNAL_EVENTS = 1 << 37
    CREATE_PORT = 1 << 38
    CONNECT_PORT = 1 << 39
    ACCESS_STATS = 1 << 40
    DEBUGGING = 1 << 43
    CPU_MANAGEMENT = 1 << 44
    ACCESS_VSM = 1 << 48
    ACCESS_VP_REGISTERS = 1 << 49
    FAST_HYPERCALL_OUTPUT = 1 << 51  # OpenVMM hvdef; TLFS shows reserved
    ENABLE_EXTENDED_HYPERCALLS = 1 << 52
    START_VIRTUAL_PROCESSOR = 1 << 53


class HvFeatures(enum.IntFlag):
    """CPUID 0x40000003 EDX feature bits."""

    GUEST_DEBUGGING = 1 << 1
    PERFORMANCE_MONITOR = 1 << 2
    CPU_DYNAMIC_PARTITIONING = 1 << 3
    XMM_HYPERCALL_INPUT = 1 << 4
    GUEST_IDLE = 1 << 5
    HYPERVISOR_SLEEP_STATE = 1 << 6
    NUMA_DISTANCE_QUERY = 1 << 7
    TIMER_FREQUENCIES = 1 << 8
    SYNTHETIC_MACHINE_CHECK = 1 << 9
    GUEST_CRASH_MSRS = 1 << 10
    DEBUG_MSRS = 1 << 11
    NPIEP = 1 << 12
    DISABLE_HYPERVISOR = 1 << 13
    EXTENDED_GVA_RANGES_FOR_FLUSH = 1 << 14
    XMM_HYPERCALL_OUTPUT = 1 << 15
    SINT_POLLING_MODE = 1 << 17
    HYPERCALL_MSR_LOCK = 1 << 18
    DIRECT_SYNTHETIC_TIMERS = 1 << 19


class HvEnlightenmentInfo(enum.IntFlag):
    """CPUID 0x40000004 EAX recommendations."""

    USE_HYPERCALL_FOR_ADDRESS_SPACE_SWITCH = 1 << 0
    USE_HYPERCALL_FOR_LOCAL_FLUSH = 1 << 1
    USE_HYPERCALL_FOR_REMOTE_FLUSH = 1 << 2
    USE_APIC_MSRS = 1 << 3
    USE_HV_RESET_MSR = 1 << 4
    USE_RELAXED_TIMING = 1 << 5
    USE_DMA_REMAPPING = 1 << 6
    USE_INTERRUPT_REMAPPING = 1 << 7
    USE_X2APIC_MSRS = 1 << 8
    DEPRECATE_AUTO_EOI = 1 << 9
    USE_SYNTHETIC_CLUSTER_IPI = 1 << 10
    USE_EX_PROCESSOR_MASKS = 1 << 11
    NESTED = 1 << 12
    USE_INT_FOR_MBEC_SYSTEM_CALLS = 1 << 13
    USE_ENLIGHTENED_VMCS = 1 << 14


# ---------------------------------------------------------------------------------------------
# Register names
# ---------------------------------------------------------------------------------------------


class HvRegisterName(enum.IntEnum):
    """HV_REGISTER_NAME values (synthetic, VSM and x64 architectural) [vsm-facts §2]."""

    HvRegisterExplicitSuspend = 0x00000000
    HvRegisterInterceptSuspend = 0x00000001
    HvRegisterInstructionEmulationHints = 0x00000002
    HvRegisterDispatchSuspend = 0x00000003
    HvRegisterInternalActivityState = 0x00000004
    HvRegisterHypervisorVersion = 0x00000100
    HvRegisterPrivilegesAndFeaturesInfo = 0x00000200
    HvRegisterFeaturesInfo = 0x00000201
    HvRegisterImplementationLimitsInfo = 0x00000202
    HvRegisterHardwareFeaturesInfo = 0x00000203
    HvRegisterGuestCrashP0 = 0x00000210
    HvRegisterGuestCrashP1 = 0x00000211
    HvRegisterGuestCrashP2 = 0x00000212
    HvRegisterGuestCrashP3 = 0x00000213
    HvRegisterGuestCrashP4 = 0x00000214
    HvRegisterGuestCrashCtl = 0x00000215
    HvRegisterPendingInterruption = 0x00010002
    HvRegisterInterruptState = 0x00010003
    HvRegisterPendingEvent0 = 0x00010004
    HvRegisterPendingEvent1 = 0x00010005
    HvRegisterDeliverabilityNotifications = 0x00010006
    HvRegisterPendingEvent2 = 0x00010008
    HvRegisterPendingEvent3 = 0x00010009
    # x64 GPRs
    HvX64RegisterRax = 0x00020000
    HvX64RegisterRcx = 0x00020001
    HvX64RegisterRdx = 0x00020002
    HvX64RegisterRbx = 0x00020003
    HvX64RegisterRsp = 0x00020004
    HvX64RegisterRbp = 0x00020005
    HvX64RegisterRsi = 0x00020006
    HvX64RegisterRdi = 0x00020007
    HvX64RegisterR8 = 0x00020008
    HvX64RegisterR9 = 0x00020009
    HvX64RegisterR10 = 0x0002000A
    HvX64RegisterR11 = 0x0002000B
    HvX64RegisterR12 = 0x0002000C
    HvX64RegisterR13 = 0x0002000D
    HvX64RegisterR14 = 0x0002000E
    HvX64RegisterR15 = 0x0002000F
    HvX64RegisterRip = 0x00020010
    HvX64RegisterRflags = 0x00020011
    # FP / vector
    HvX64RegisterXmm0 = 0x00030000
    HvX64RegisterXmm1 = 0x00030001
    HvX64RegisterXmm2 = 0x00030002
    HvX64RegisterXmm3 = 0x00030003
    HvX64RegisterXmm4 = 0x00030004
    HvX64RegisterXmm5 = 0x00030005
    HvX64RegisterXmm6 = 0x00030006
    HvX64RegisterXmm7 = 0x00030007
    HvX64RegisterXmm8 = 0x00030008
    HvX64RegisterXmm9 = 0x00030009
    HvX64RegisterXmm10 = 0x0003000A
    HvX64RegisterXmm11 = 0x0003000B
    HvX64RegisterXmm12 = 0x0003000C
    HvX64RegisterXmm13 = 0x0003000D
    HvX64RegisterXmm14 = 0x0003000E
    HvX64RegisterXmm15 = 0x0003000F
    HvX64RegisterFpMmx0 = 0x00030010
    HvX64RegisterFpMmx1 = 0x00030011
    HvX64RegisterFpMmx2 = 0x00030012
    HvX64RegisterFpMmx3 = 0x00030013
    HvX64RegisterFpMmx4 = 0x00030014
    HvX64RegisterFpMmx5 = 0x00030015
    HvX64RegisterFpMmx6 = 0x00030016
    HvX64RegisterFpMmx7 = 0x00030017
    HvX64RegisterFpControlStatus = 0x00030018
    HvX64RegisterXmmControlStatus = 0x00030019
    # control
    HvX64RegisterCr0 = 0x00040000
    HvX64RegisterCr2 = 0x00040001
    HvX64RegisterCr3 = 0x00040002
    HvX64RegisterCr4 = 0x00040003
    HvX64RegisterCr8 = 0x00040004
    HvX64RegisterXfem = 0x00040005
    HvX64RegisterIntermediateCr0 = 0x00041000
    HvX64RegisterIntermediateCr3 = 0x00041002
    HvX64RegisterIntermediateCr4 = 0x00041003
    HvX64RegisterIntermediateCr8 = 0x00041004
    # debug
    HvX64RegisterDr0 = 0x00050000
    HvX64RegisterDr1 = 0x00050001
    HvX64RegisterDr2 = 0x00050002
    HvX64RegisterDr3 = 0x00050003
    HvX64RegisterDr6 = 0x00050004
    HvX64RegisterDr7 = 0x00050005
    # segments / tables
    HvX64RegisterEs = 0x00060000
    HvX64RegisterCs = 0x00060001
    HvX64RegisterSs = 0x00060002
    HvX64RegisterDs = 0x00060003
    HvX64RegisterFs = 0x00060004
    HvX64RegisterGs = 0x00060005
    HvX64RegisterLdtr = 0x00060006
    HvX64RegisterTr = 0x00060007
    HvX64RegisterIdtr = 0x00070000
    HvX64RegisterGdtr = 0x00070001
    # MSRs
    HvX64RegisterTsc = 0x00080000
    HvX64RegisterEfer = 0x00080001
    HvX64RegisterKernelGsBase = 0x00080002
    HvX64RegisterApicBase = 0x00080003
    HvX64RegisterPat = 0x00080004
    HvX64RegisterSysenterCs = 0x00080005
    HvX64RegisterSysenterEip = 0x00080006
    HvX64RegisterSysenterEsp = 0x00080007
    HvX64RegisterStar = 0x00080008
    HvX64RegisterLstar = 0x00080009
    HvX64RegisterCstar = 0x0008000A
    HvX64RegisterSfmask = 0x0008000B
    HvX64RegisterInitialApicId = 0x0008000C
    HvX64RegisterMsrMtrrCap = 0x0008000D
    HvX64RegisterMsrMtrrDefType = 0x0008000E
    HvX64RegisterTscAux = 0x0008007B
    HvX64RegisterBndcfgs = 0x0008007C
    HvX64RegisterDebugCtl = 0x0008007D
    HvX64RegisterSpecCtrl = 0x00080084
    HvX64RegisterPredCmd = 0x00080085
    HvX64RegisterXss = 0x0008008B
    HvX64RegisterUCet = 0x0008008C
    HvX64RegisterSCet = 0x0008008D
    HvX64RegisterSsp = 0x0008008E
    HvX64RegisterPl0Ssp = 0x0008008F
    HvX64RegisterPl1Ssp = 0x00080090
    HvX64RegisterPl2Ssp = 0x00080091
    HvX64RegisterPl3Ssp = 0x00080092
    HvX64RegisterInterruptSspTableAddr = 0x00080093
    HvX64RegisterTscDeadline = 0x00080095
    HvX64RegisterTscAdjust = 0x00080096
    # APIC (x2APIC MSR offsets)
    HvX64RegisterApicId = 0x00084802
    HvX64RegisterApicVersion = 0x00084803
    HvX64RegisterApicTpr = 0x00084808
    HvX64RegisterApicPpr = 0x0008480A
    HvX64RegisterApicEoi = 0x0008480B
    HvX64RegisterApicLdr = 0x0008480D
    HvX64RegisterApicSpurious = 0x0008480F
    HvX64RegisterApicEse = 0x00084828
    HvX64RegisterApicIcr = 0x00084830
    HvX64RegisterApicLvtTimer = 0x00084832
    HvX64RegisterApicLvtThermal = 0x00084833
    HvX64RegisterApicLvtPerfmon = 0x00084834
    HvX64RegisterApicLvtLint0 = 0x00084835
    HvX64RegisterApicLvtLint1 = 0x00084836
    HvX64RegisterApicLvtError = 0x00084837
    HvX64RegisterApicInitCount = 0x00084838
    HvX64RegisterApicCurrentCount = 0x00084839
    HvX64RegisterApicDivide = 0x0008483E
    HvX64RegisterApicSelfIpi = 0x0008483F
    # synthetic
    HvRegisterVpRuntime = 0x00090000
    HvX64RegisterHypercall = 0x00090001
    HvRegisterGuestOsId = 0x00090002
    HvRegisterVpIndex = 0x00090003
    HvRegisterTimeRefCount = 0x00090004
    HvRegisterVpAssistPage = 0x00090013
    HvRegisterReferenceTsc = 0x00090017
    HvRegisterSint0 = 0x000A0000
    HvRegisterSint1 = 0x000A0001
    HvRegisterSint2 = 0x000A0002
    HvRegisterSint3 = 0x000A0003
    HvRegisterSint4 = 0x000A0004
    HvRegisterSint5 = 0x000A0005
    HvRegisterSint6 = 0x000A0006
    HvRegisterSint7 = 0x000A0007
    HvRegisterSint8 = 0x000A0008
    HvRegisterSint9 = 0x000A0009
    HvRegisterSint10 = 0x000A000A
    HvRegisterSint11 = 0x000A000B
    HvRegisterSint12 = 0x000A000C
    HvRegisterSint13 = 0x000A000D
    HvRegisterSint14 = 0x000A000E
    HvRegisterSint15 = 0x000A000F
    HvRegisterScontrol = 0x000A0010
    HvRegisterSversion = 0x000A0011
    HvRegisterSifp = 0x000A0012
    HvRegisterSipp = 0x000A0013
    HvRegisterEom = 0x000A0014
    HvRegisterSirbp = 0x000A0015
    HvRegisterStimer0Config = 0x000B0000
    HvRegisterStimer0Count = 0x000B0001
    HvRegisterStimer1Config = 0x000B0002
    HvRegisterStimer1Count = 0x000B0003
    HvRegisterStimer2Config = 0x000B0004
    HvRegisterStimer2Count = 0x000B0005
    HvRegisterStimer3Config = 0x000B0006
    HvRegisterStimer3Count = 0x000B0007
    # VSM
    HvRegisterVsmCodePageOffsets = 0x000D0002
    HvRegisterVsmVpStatus = 0x000D0003
    HvRegisterVsmPartitionStatus = 0x000D0004
    HvRegisterVsmVina = 0x000D0005
    HvRegisterVsmCapabilities = 0x000D0006
    HvRegisterVsmPartitionConfig = 0x000D0007
    HvRegisterGuestVsmPartitionConfig = 0x000D0008
    HvRegisterVsmVpSecureConfigVtl0 = 0x000D0010
    HvRegisterVsmVpSecureConfigVtl1 = 0x000D0011
    HvRegisterVsmVpSecureConfigVtl2 = 0x000D0012
    HvRegisterVsmVpSecureConfigVtl3 = 0x000D0013
    HvRegisterVsmVpSecureConfigVtl4 = 0x000D0014
    HvRegisterVsmVpSecureConfigVtl5 = 0x000D0015
    HvRegisterVsmVpSecureConfigVtl6 = 0x000D0016
    HvRegisterVsmVpSecureConfigVtl7 = 0x000D0017
    HvRegisterVsmVpSecureConfigVtl8 = 0x000D0018
    HvRegisterVsmVpSecureConfigVtl9 = 0x000D0019
    HvRegisterVsmVpSecureConfigVtl10 = 0x000D001A
    HvRegisterVsmVpSecureConfigVtl11 = 0x000D001B
    HvRegisterVsmVpSecureConfigVtl12 = 0x000D001C
    HvRegisterVsmVpSecureConfigVtl13 = 0x000D001D
    HvRegisterVsmVpSecureConfigVtl14 = 0x000D001E
    HvRegisterVsmVpWaitForTlbLock = 0x000D0020
    HvX64RegisterCrInterceptControl = 0x000E0000
    HvX64RegisterCrInterceptCr0Mask = 0x000E0001
    HvX64RegisterCrInterceptCr4Mask = 0x000E0002
    HvX64RegisterCrInterceptIa32MiscEnableMask = 0x000E0003


HV_REGISTER_VALUE_SIZE = 16


# ---------------------------------------------------------------------------------------------
# VSM register layouts (vsm-facts §2.3)
# ---------------------------------------------------------------------------------------------


class VsmCodePageOffsets:
    """HvRegisterVsmCodePageOffsets: 11:0 VTL call offset, 23:12 VTL return offset."""

    CALL_MASK = 0xFFF
    RETURN_SHIFT = 12
    RETURN_MASK = 0xFFF

    @staticmethod
    def encode(call_offset: int, return_offset: int) -> int:
        return (call_offset & VsmCodePageOffsets.CALL_MASK) | (
            (return_offset & VsmCodePageOffsets.RETURN_MASK) << VsmCodePageOffsets.RETURN_SHIFT
        )


class VsmVpStatus:
    """HvRegisterVsmVpStatus: 3:0 active VTL, 4 active MBEC, 31:16 enabled VTL set."""

    ACTIVE_VTL_MASK = 0xF
    ACTIVE_MBEC_ENABLED = 1 << 4
    ENABLED_VTL_SET_SHIFT = 16
    ENABLED_VTL_SET_MASK = 0xFFFF


class VsmPartitionStatus:
    """HvRegisterVsmPartitionStatus: 15:0 enabled VTL set, 19:16 maximum VTL, 35:20 MBEC-enabled VTL set."""

    ENABLED_VTL_SET_MASK = 0xFFFF
    MAXIMUM_VTL_SHIFT = 16
    MAXIMUM_VTL_MASK = 0xF
    MBEC_ENABLED_VTL_SET_SHIFT = 20
    MBEC_ENABLED_VTL_SET_MASK = 0xFFFF


class VsmPartitionConfig(enum.IntFlag):
    """HvRegisterVsmPartitionConfig bits (protection mask is bits 4:1)."""

    ENABLE_VTL_PROTECTION = 1 << 0
    DEFAULT_VTL_PROTECTION_MASK = 0xF << 1
    ZERO_MEMORY_ON_RESET = 1 << 5
    DENY_LOWER_VTL_STARTUP = 1 << 6
    INTERCEPT_ACCEPTANCE = 1 << 7
    INTERCEPT_ENABLE_VTL_PROTECTION = 1 << 8
    INTERCEPT_VP_STARTUP = 1 << 9
    INTERCEPT_CPUID_UNIMPLEMENTED = 1 << 10
    INTERCEPT_UNRECOVERABLE_EXCEPTION = 1 << 11
    INTERCEPT_PAGE = 1 << 12


VSM_PARTITION_CONFIG_PROTECTION_MASK_SHIFT = 1


class VsmVpSecureConfig(enum.IntFlag):
    MBEC_ENABLED = 1 << 0
    TLB_LOCKED = 1 << 1


class VsmVina:
    """HvRegisterVsmVina: 7:0 vector, 8 enabled, 9 auto-reset, 10 auto-EOI."""

    VECTOR_MASK = 0xFF
    ENABLED = 1 << 8
    AUTO_RESET = 1 << 9
    AUTO_EOI = 1 << 10


class VsmCapabilities(enum.IntFlag):
    """HvRegisterVsmCapabilities in the OpenVMM/mshv layout (vsm-facts §6.1 recommendation)."""

    DR6_SHARED = 1 << 0
    MBEC_VTL_MASK = 0xFFFF << 1
    DENY_LOWER_VTL_STARTUP = 1 << 17
    SUPERVISOR_SHADOW_STACK = 1 << 18
    HARDWARE_HVPT_AVAILABLE = 1 << 19
    SOFTWARE_HVPT_AVAILABLE = 1 << 20
    INTERCEPT_PAGE_AVAILABLE = 1 << 27


class CrInterceptControl(enum.IntFlag):
    CR0_WRITE = 1 << 0
    CR4_WRITE = 1 << 1
    XCR0_WRITE = 1 << 2
    IA32_MISC_ENABLE_READ = 1 << 3
    IA32_MISC_ENABLE_WRITE = 1 << 4
    MSR_LSTAR_READ = 1 << 5
    MSR_LSTAR_WRITE = 1 << 6
    MSR_STAR_READ = 1 << 7
    MSR_STAR_WRITE = 1 << 8
    MSR_CSTAR_READ = 1 << 9
    MSR_CSTAR_WRITE = 1 << 10
    APIC_BASE_MSR_READ = 1 << 11
    APIC_BASE_MSR_WRITE = 1 << 12
    MSR_EFER_READ = 1 << 13
    MSR_EFER_WRITE = 1 << 14
    GDTR_WRITE = 1 << 15
    IDTR_WRITE = 1 << 16
    LDTR_WRITE = 1 << 17
    TR_WRITE = 1 << 18
    MSR_SYSENTER_CS_WRITE = 1 << 19
    MSR_SYSENTER_EIP_WRITE = 1 << 20
    MSR_SYSENTER_ESP_WRITE = 1 << 21
    MSR_SFMASK_WRITE = 1 << 22
    MSR_TSC_AUX_WRITE = 1 << 23
    MSR_SGX_LAUNCH_CONTROL_WRITE = 1 << 24


class PendingEventType(enum.IntEnum):
    EXCEPTION = 0
    MEMORY_INTERCEPT = 1
    NESTED_MEMORY_INTERCEPT = 2
    VIRTUALIZATION_FAULT = 3
    HYPERCALL_OUTPUT = 4
    EXT_INT = 5
    SHADOW_IPT = 6


class PendingExceptionEvent:
    """HvRegisterPendingEvent0 exception form: 0 pending, 3:1 type, 8 deliver error code, 31:16 vector, 63:32 error code."""

    EVENT_PENDING = 1 << 0
    EVENT_TYPE_SHIFT = 1
    EVENT_TYPE_MASK = 0x7
    DELIVER_ERROR_CODE = 1 << 8
    VECTOR_SHIFT = 16
    VECTOR_MASK = 0xFFFF
    ERROR_CODE_SHIFT = 32
    ERROR_CODE_MASK = 0xFFFF_FFFF


class VtlEntryReason(enum.IntEnum):
    RESERVED = 0
    VTL_CALL = 1
    INTERRUPT = 2
    INTERCEPT = 3


class VtlReturnInput:
    """VTL return control input (RAX at the trap): bit 0 = fast return, rest RsvdZ."""

    FAST = 1 << 0


class HvMapGpaFlags(enum.IntFlag):
    """HV_MAP_GPA_FLAGS (VTL protections)."""

    NO_ACCESS = 0
    READABLE = 1 << 0
    WRITABLE = 1 << 1
    KERNEL_EXECUTABLE = 1 << 2
    USER_EXECUTABLE = 1 << 3
    SUPERVISOR_SHADOW_STACK = 1 << 4
    PAGING_WRITABILITY = 1 << 5
    VERIFY_PAGING_WRITABILITY = 1 << 6
    ADJUSTABLE = 1 << 15


HV_MAP_GPA_PERMISSIONS_ALL = 0xF


class EnablePartitionVtlFlags(enum.IntFlag):
    ENABLE_MBEC = 1 << 0
    ENABLE_SUPERVISOR_SHADOW_STACK = 1 << 1
    ENABLE_HARDWARE_HVPT = 1 << 2


class HvTranslateGvaControlFlags(enum.IntFlag):
    VALIDATE_READ = 0x001
    VALIDATE_WRITE = 0x002
    VALIDATE_EXECUTE = 0x004
    PRIVILEGE_EXEMPT = 0x008
    SET_PAGE_TABLE_BITS = 0x010
    TLB_FLUSH_INHIBIT = 0x020
    SUPERVISOR_ACCESS = 0x040
    USER_ACCESS = 0x080
    ENFORCE_SMAP = 0x100
    OVERRIDE_SMAP = 0x200
    SHADOW_STACK = 0x400


HV_TRANSLATE_GVA_INPUT_VTL_SHIFT = 56


class HvTranslateGvaResultCode(enum.IntEnum):
    SUCCESS = 0
    PAGE_NOT_PRESENT = 1
    PRIVILEGE_VIOLATION = 2
    INVALID_PAGE_TABLE_FLAGS = 3
    GPA_UNMAPPED = 4
    GPA_NO_READ_ACCESS = 5
    GPA_NO_WRITE_ACCESS = 6
    GPA_ILLEGAL_OVERLAY_ACCESS = 7
    INTERCEPT = 8
    GPA_UNACCEPTED = 9


class HvTranslateGvaResult:
    """TranslationResult u64: 31:0 result code, 39:32 cache type, 40 overlay page."""

    RESULT_CODE_MASK = 0xFFFF_FFFF
    CACHE_TYPE_SHIFT = 32
    CACHE_TYPE_MASK = 0xFF
    OVERLAY_PAGE = 1 << 40


class HvCacheType(enum.IntEnum):
    UNCACHED = 0
    WRITE_COMBINING = 1
    WRITE_THROUGH = 4
    WRITE_PROTECTED = 5
    WRITE_BACK = 6


class HvInterceptAccessType(enum.IntEnum):
    """Access type in intercept messages (an enum, not the 1/2/4 mask of InstallIntercept)."""

    READ = 0
    WRITE = 1
    EXECUTE = 2


class HvX64VpExecutionState:
    """ExecutionState u16 of the intercept header."""

    CPL_MASK = 0x3
    CR0_PE = 1 << 2
    CR0_AM = 1 << 3
    EFER_LMA = 1 << 4
    DEBUG_ACTIVE = 1 << 5
    INTERRUPTION_PENDING = 1 << 6
    VTL_SHIFT = 7
    VTL_MASK = 0xF
    ENCLAVE_MODE = 1 << 11
    INTERRUPT_SHADOW = 1 << 12


class HvX64MemoryAccessInfo:
    GVA_VALID = 1 << 0
    GVA_GPA_VALID = 1 << 1
    HYPERCALL_OUTPUT_PENDING = 1 << 2
    TLB_LOCKED = 1 << 3


# ---------------------------------------------------------------------------------------------
# HV_INPUT_VTL, flush flags, VP sets
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HvInputVtl:
    """HV_INPUT_VTL (u8): 3:0 target VTL, 4 use target VTL, 7:5 RsvdZ."""

    TARGET_VTL_MASK: ClassVar[int] = 0xF
    USE_TARGET_VTL: ClassVar[int] = 1 << 4
    RESERVED_MASK: ClassVar[int] = 0xE0

    target_vtl: int = 0
    use_target_vtl: bool = False
    reserved: int = 0

    @classmethod
    def decode(cls, value: int) -> HvInputVtl:
        return cls(
            target_vtl=value & cls.TARGET_VTL_MASK,
            use_target_vtl=bool(value & cls.USE_TARGET_VTL),
            reserved=value & cls.RESERVED_MASK,
        )

    def encode(self) -> int:
        return (self.target_vtl & self.TARGET_VTL_MASK) | (self.USE_TARGET_VTL if self.use_target_vtl else 0)

    def resolve(self, caller_vtl: int) -> int:
        """The VTL this input names: the target if UseTargetVtl, else the caller's own."""
        return self.target_vtl if self.use_target_vtl else caller_vtl


class HvFlushFlags(enum.IntFlag):
    """HV_FLUSH_* flags (u64) [TLFS; OpenVMM HvFlushFlags]."""

    ALL_PROCESSORS = 1 << 0
    ALL_VIRTUAL_ADDRESS_SPACES = 1 << 1
    NON_GLOBAL_MAPPINGS_ONLY = 1 << 2
    USE_EXTENDED_RANGE_FORMAT = 1 << 3
    USE_TARGET_VTL = 1 << 4
    TARGET_VTL0 = 1 << 8
    TARGET_VTL1 = 1 << 9


HV_FLUSH_TARGET_VTL_SHIFT = 8
HV_FLUSH_TARGET_VTL_MASK = 0xFF << HV_FLUSH_TARGET_VTL_SHIFT
HV_FLUSH_VALID_FLAGS = (
    HvFlushFlags.ALL_PROCESSORS
    | HvFlushFlags.ALL_VIRTUAL_ADDRESS_SPACES
    | HvFlushFlags.NON_GLOBAL_MAPPINGS_ONLY
    | HvFlushFlags.USE_EXTENDED_RANGE_FORMAT
    | HvFlushFlags.USE_TARGET_VTL
    | HvFlushFlags.TARGET_VTL0
    | HvFlushFlags.TARGET_VTL1
)


class HvGvaRange:
    """HV_GVA_RANGE (simple form): 11:0 additional pages, 63:12 GVA page number."""

    ADDITIONAL_PAGES_MASK = 0xFFF
    GVA_PAGE_SHIFT = HV_PAGE_SHIFT
    SIZE = 8


class HvGenericSetFormat(enum.IntEnum):
    """HV_VP_SET format."""

    SPARSE_4K = 0
    ALL = 1


HV_VP_SET_BANK_SIZE = 64  # VPs per bank
HV_PROCESSOR_MASK_BITS = 64  # VPs a non-Ex ProcessorMask can name
HV_VP_SET_MAX_BANKS = 64


@dataclass
class HvVpSet:
    """HV_VP_SET: Format u64, ValidBanksMask u64, BankContents[] u64."""

    format: int
    valid_banks_mask: int
    banks: list[int] = field(default_factory=list)

    HEADER_SIZE: ClassVar[int] = 16

    def pack(self) -> bytes:
        return struct.pack(f"<QQ{len(self.banks)}Q", self.format, self.valid_banks_mask, *self.banks)

    def vp_indices(self, vp_count: int) -> list[int]:
        """Member VP indices below ``vp_count`` (raises ValueError if banks are missing)."""
        if self.format == HvGenericSetFormat.ALL:
            return list(range(vp_count))
        result = []
        bank_iter = iter(self.banks)
        for bank in range(HV_VP_SET_MAX_BANKS):
            if not self.valid_banks_mask & (1 << bank):
                continue
            try:
                mask = next(bank_iter)
            except StopIteration:
                raise ValueError("HV_VP_SET has fewer banks than ValidBanksMask bits") from None
            for bit in range(HV_VP_SET_BANK_SIZE):
                if mask & (1 << bit):
                    vp = bank * HV_VP_SET_BANK_SIZE + bit
                    if vp < vp_count:
                        result.append(vp)
        return result

    @staticmethod
    def sparse(vp_indices: list[int]) -> HvVpSet:
        """Build a sparse set (for tests and for the VMM's own use)."""
        banks: dict[int, int] = {}
        for vp in vp_indices:
            banks[vp // HV_VP_SET_BANK_SIZE] = banks.get(vp // HV_VP_SET_BANK_SIZE, 0) | (
                1 << (vp % HV_VP_SET_BANK_SIZE)
            )
        mask = 0
        for b in banks:
            mask |= 1 << b
        return HvVpSet(HvGenericSetFormat.SPARSE_4K, mask, [banks[b] for b in sorted(banks)])


# ---------------------------------------------------------------------------------------------
# struct-based dataclasses
# ---------------------------------------------------------------------------------------------


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


class PackedStruct:
    """Base for fixed-layout structures: subclasses are dataclasses whose fields follow ``FORMAT``.

    Fields of type ``bytes`` map to ``Ns`` formats; everything else to integer formats.
    """

    FORMAT: ClassVar[str]
    SIZE: ClassVar[int]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "FORMAT" in cls.__dict__:
            cls.SIZE = struct.calcsize(cls.FORMAT)

    def pack(self) -> bytes:
        cls = type(self)
        names = _FIELD_NAMES.get(cls)
        if names is None:  # the dataclass fields, looked up once per class (fields() is slow, pack is per hypercall)
            names = _FIELD_NAMES[cls] = tuple(f.name for f in fields(self))  # type: ignore[arg-type]
        return struct.pack(self.FORMAT, *[getattr(self, name) for name in names])

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        return cls(*struct.unpack_from(cls.FORMAT, data))


class HvMessageFlags:
    MESSAGE_PENDING = 1 << 0


class HvMessageType(enum.IntEnum):
    """HV_MESSAGE_TYPE [TLFS hv_message_type; OpenVMM]."""

    HvMessageTypeNone = 0x00000000
    HvMessageTypeUnmappedGpa = 0x80000000
    HvMessageTypeGpaIntercept = 0x80000001
    HvMessageTypeUnacceptedGpa = 0x80000003
    HvMessageTypeGpaAttributeIntercept = 0x80000004
    HvMessageTypeEnablePartitionVtlIntercept = 0x80000005
    HvMessageTypeTimerExpired = 0x80000010
    HvMessageTypeInvalidVpRegisterValue = 0x80000020
    HvMessageTypeUnrecoverableException = 0x80000021
    HvMessageTypeUnsupportedFeature = 0x80000022
    HvMessageTypeTlbPageSizeMismatch = 0x80000023
    HvMessageTypeHypercallIntercept = 0x80000050
    HvMessageTypeSynicEventIntercept = 0x80000060
    HvMessageTypeSynicSintIntercept = 0x80000061
    HvMessageTypeSynicSintDeliverable = 0x80000062
    HvMessageTypeAsyncCallCompletion = 0x80000070
    HvMessageTypeX64IoPortIntercept = 0x80010000
    HvMessageTypeMsrIntercept = 0x80010001
    HvMessageTypeX64CpuidIntercept = 0x80010002
    HvMessageTypeExceptionIntercept = 0x80010003
    HvMessageTypeX64ApicEoi = 0x80010004
    HvMessageTypeRegisterIntercept = 0x80010006
    HvMessageTypeX64Halt = 0x80010007
    HvMessageTypeX64InterruptionDeliverable = 0x80010008
    HvMessageTypeX64SipiIntercept = 0x80010009


HV_MESSAGE_TYPE_HYPERVISOR_MASK = 0x80000000
HV_MESSAGE_SIZE = 256
HV_MESSAGE_HEADER_SIZE = 16
HV_MESSAGE_TYPE_SIZE = 4  # MessageType u32 at offset 0: non-zero marks a SIM slot full
HV_MESSAGE_FLAGS_OFFSET = 5  # MessageFlags u8 (bit 0 MessagePending)
HV_MESSAGE_MAX_PAYLOAD = 240
HV_SYNIC_INTERCEPTION_SINT_INDEX = 0
HV_EVENT_FLAGS_BYTE_COUNT = 256
HV_EVENT_FLAGS_COUNT = HV_EVENT_FLAGS_BYTE_COUNT * 8
#: Guest message buffers per port (TLFS: sixteen per port); beyond that INSUFFICIENT_BUFFERS.
HV_MESSAGE_BUFFERS_PER_PORT = 16


@dataclass
class HvMessageHeader(PackedStruct):
    """HV_MESSAGE_HEADER: type u32 @0, size u8 @4, flags u8 @5, rsvd u16 @6, origination id u64 @8."""

    FORMAT: ClassVar[str] = "<IBBHQ"
    message_type: int = 0
    payload_size: int = 0
    message_flags: int = 0
    reserved: int = 0
    origination_id: int = 0


@dataclass
class HvMessage:
    """HV_MESSAGE: 16-byte header + 240-byte payload = 256 bytes."""

    header: HvMessageHeader
    payload: bytes = b""

    SIZE: ClassVar[int] = HV_MESSAGE_SIZE

    def pack(self) -> bytes:
        return self.header.pack() + self.payload[:HV_MESSAGE_MAX_PAYLOAD].ljust(HV_MESSAGE_MAX_PAYLOAD, b"\0")

    @classmethod
    def unpack(cls, data: bytes) -> HvMessage:
        header = HvMessageHeader.unpack(data)
        return cls(header, bytes(data[HV_MESSAGE_HEADER_SIZE : HV_MESSAGE_HEADER_SIZE + header.payload_size]))

    @classmethod
    def build(cls, message_type: int, payload: bytes, origination_id: int = 0) -> HvMessage:
        return cls(HvMessageHeader(message_type, len(payload), 0, 0, origination_id), bytes(payload))


@dataclass
class HvTimerMessagePayload(PackedStruct):
    """HV_TIMER_MESSAGE_PAYLOAD: timer index, reserved, expiration time, delivery time (100 ns)."""

    FORMAT: ClassVar[str] = "<IIQQ"
    timer_index: int = 0
    reserved: int = 0
    expiration_time: int = 0
    delivery_time: int = 0


@dataclass
class HvX64SegmentRegister(PackedStruct):
    """HV_X64_SEGMENT_REGISTER: base u64, limit u32, selector u16, attributes u16."""

    FORMAT: ClassVar[str] = "<QIHH"
    base: int = 0
    limit: int = 0
    selector: int = 0
    attributes: int = 0


@dataclass
class HvX64TableRegister(PackedStruct):
    """HV_X64_TABLE_REGISTER: pad u16[3], limit u16, base u64."""

    FORMAT: ClassVar[str] = "<6xHQ"
    limit: int = 0
    base: int = 0


@dataclass
class HvX64InterceptMessageHeader(PackedStruct):
    """HV_X64_INTERCEPT_MESSAGE_HEADER (40 bytes); cs is a packed HV_X64_SEGMENT_REGISTER."""

    FORMAT: ClassVar[str] = "<IBBH16sQQ"
    vp_index: int = 0
    instruction_length: int = 0
    intercept_access_type: int = 0
    execution_state: int = 0
    cs: bytes = bytes(16)
    rip: int = 0
    rflags: int = 0


@dataclass
class HvX64MemoryInterceptMessage(PackedStruct):
    """HV_X64_MEMORY_INTERCEPT_MESSAGE (TLFS part, 0x50 bytes of payload) [vsm-facts §3.4]."""

    FORMAT: ClassVar[str] = "<40sIBBBBQQ16s"
    header: bytes = bytes(40)  # packed HvX64InterceptMessageHeader
    cache_type: int = HvCacheType.WRITE_BACK
    instruction_byte_count: int = 0
    memory_access_info: int = 0
    tpr_priority: int = 0
    reserved: int = 0
    guest_virtual_address: int = 0
    guest_physical_address: int = 0
    instruction_bytes: bytes = bytes(16)


#: The seed's register tail after the TLFS part: Ds, Ss (16 B each) then RAX..R15 (u64 each).
HV_SEED_INTERCEPT_TAIL_SEGMENTS = ("ds", "ss")
HV_SEED_INTERCEPT_TAIL_GPRS = (
    "rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
)  # fmt: skip
HV_SEED_INTERCEPT_PAYLOAD_SIZE = HV_MESSAGE_MAX_PAYLOAD


class HvVpAssistPageLayout:
    """Offsets inside the VP assist page (and its HV_VP_VTL_CONTROL at 0x08)."""

    APIC_ASSIST = 0x000
    VTL_CONTROL = 0x008
    VTL_ENTRY_REASON = 0x008
    VTL_VINA_STATUS = 0x00C
    VTL_RETURN_X64_RAX = 0x010
    VTL_RETURN_X64_RCX = 0x018
    VTL_RETURN_X86_EAX = 0x010
    VTL_RETURN_X86_ECX = 0x014
    VTL_RETURN_X86_EDX = 0x018
    NESTED_ENLIGHTENMENTS_CONTROL = 0x020
    ENLIGHTEN_VM_ENTRY = 0x028
    CURRENT_NESTED_VMCS = 0x030
    SYNTHETIC_TIME_UNHALTED_TIMER_EXPIRED = 0x038
    VIRTUALIZATION_FAULT_INFORMATION = 0x040
    INTERCEPT_MESSAGE = 0x070
    VTL_RETURN_ACTIONS = 0x170
    END = 0x270


HV_APIC_ASSIST_NO_EOI_REQUIRED = 1 << 0
HV_VINA_STATUS_ASSERTED = 1 << 0


@dataclass
class HvVpVtlControl(PackedStruct):
    """HV_VP_VTL_CONTROL (24 bytes at assist page offset 0x08)."""

    FORMAT: ClassVar[str] = "<IBBHQQ"
    entry_reason: int = 0
    vina_status: int = 0
    reserved0: int = 0
    reserved1: int = 0
    vtl_return_rax: int = 0
    vtl_return_rcx: int = 0


@dataclass
class HvReferenceTscPage(PackedStruct):
    """HV_REFERENCE_TSC_PAGE head: sequence u32, rsvd u32, scale u64, offset i64 (rest of page reserved)."""

    FORMAT: ClassVar[str] = "<IIQq"
    tsc_sequence: int = 0
    reserved: int = 0
    tsc_scale: int = 0
    tsc_offset: int = 0


#: A sequence of 0 tells the guest the TSC page is unusable (fall back to TIME_REF_COUNT).
HV_REFERENCE_TSC_SEQUENCE_INVALID = 0
HV_REFERENCE_TSC_SCALE_SHIFT = 64


# ---------------------------------------------------------------------------------------------
# Hypercall input/output layouts
# ---------------------------------------------------------------------------------------------


@dataclass
class HvInputFlushVirtualAddressSpace(PackedStruct):
    """HvCallFlushVirtualAddressSpace / List header (24 B)."""

    FORMAT: ClassVar[str] = "<QQQ"
    address_space: int = 0
    flags: int = 0
    processor_mask: int = 0


@dataclass
class HvInputFlushVirtualAddressSpaceEx(PackedStruct):
    """HvCallFlushVirtualAddressSpaceEx / ListEx fixed header; banks follow as the variable header."""

    FORMAT: ClassVar[str] = "<QQQQ"
    address_space: int = 0
    flags: int = 0
    vp_set_format: int = 0
    valid_banks_mask: int = 0


@dataclass
class HvInputSendSyntheticClusterIpi(PackedStruct):
    """HvCallSendSyntheticClusterIpi (16 B): vector u32, target vtl u8, flags u8, rsvd u16, mask u64."""

    FORMAT: ClassVar[str] = "<IBBHQ"
    vector: int = 0
    target_vtl: int = 0
    flags: int = 0
    reserved: int = 0
    processor_mask: int = 0


@dataclass
class HvInputSendSyntheticClusterIpiEx(PackedStruct):
    """HvCallSendSyntheticClusterIpiEx fixed header (24 B); banks follow as the variable header."""

    FORMAT: ClassVar[str] = "<IBBHQQ"
    vector: int = 0
    target_vtl: int = 0
    flags: int = 0
    reserved: int = 0
    vp_set_format: int = 0
    valid_banks_mask: int = 0


HV_IPI_VECTOR_MIN = 0x10
HV_IPI_VECTOR_MAX = 0xFF


@dataclass
class HvInputNotifyLongSpinWait(PackedStruct):
    FORMAT: ClassVar[str] = "<II"
    spin_count: int = 0
    reserved: int = 0


@dataclass
class HvOutputGetPartitionId(PackedStruct):
    FORMAT: ClassVar[str] = "<Q"
    partition_id: int = 0


@dataclass
class HvInputGetVpIndexFromApicId(PackedStruct):
    """HvCallGetVpIndexFromApicId header: partition id u64, target vtl u8, pad 7."""

    FORMAT: ClassVar[str] = "<QB7x"
    partition_id: int = 0
    target_vtl: int = 0


#: Element sizes: u32 APIC ID in, u32 VP index out (OpenVMM/Linux; vsm-facts §6.3).
HV_APIC_ID_ELEMENT_SIZE = 4
HV_VP_INDEX_ELEMENT_SIZE = 4


@dataclass
class HvInputPostMessage(PackedStruct):
    """HvCallPostMessage (256 B): connection id u32, rsvd u32, type u32, payload size u32, payload[240]."""

    FORMAT: ClassVar[str] = "<IIII240s"
    connection_id: int = 0
    reserved: int = 0
    message_type: int = 0
    payload_size: int = 0
    payload: bytes = bytes(HV_MESSAGE_MAX_PAYLOAD)


@dataclass
class HvInputSignalEvent(PackedStruct):
    """HvCallSignalEvent (8 B): connection id u32, flag number u16, rsvd u16."""

    FORMAT: ClassVar[str] = "<IHH"
    connection_id: int = 0
    flag_number: int = 0
    reserved: int = 0


@dataclass
class HvInputGetSetVpRegisters(PackedStruct):
    """HvCallGet/SetVpRegisters header (16 B): partition id, vp index, HV_INPUT_VTL, rsvd[3]."""

    FORMAT: ClassVar[str] = "<QIB3x"
    partition_id: int = 0
    vp_index: int = 0
    target_vtl: int = 0


HV_GET_VP_REGISTERS_ELEMENT_SIZE = 4  # register name in
HV_GET_VP_REGISTERS_OUTPUT_SIZE = HV_REGISTER_VALUE_SIZE  # value out


@dataclass
class HvRegisterAssoc(PackedStruct):
    """HvCallSetVpRegisters element (32 B): name u32, rsvd[12], value[16]."""

    FORMAT: ClassVar[str] = "<I12x16s"
    name: int = 0
    value: bytes = bytes(HV_REGISTER_VALUE_SIZE)


@dataclass
class HvInputEnablePartitionVtl(PackedStruct):
    """HvCallEnablePartitionVtl (16 B): partition id u64, target vtl u8, flags u8, rsvd[6]."""

    FORMAT: ClassVar[str] = "<QBB6x"
    partition_id: int = 0
    target_vtl: int = 0
    flags: int = 0


@dataclass
class HvInitialVpContext(PackedStruct):
    """HV_INITIAL_VP_CONTEXT (x64, 224 B); segments/tables are packed 16-byte values."""

    FORMAT: ClassVar[str] = "<QQQ16s16s16s16s16s16s16s16s16s16sQQQQQ"
    rip: int = 0
    rsp: int = 0
    rflags: int = 0
    cs: bytes = bytes(16)
    ds: bytes = bytes(16)
    es: bytes = bytes(16)
    fs: bytes = bytes(16)
    gs: bytes = bytes(16)
    ss: bytes = bytes(16)
    tr: bytes = bytes(16)
    ldtr: bytes = bytes(16)
    idtr: bytes = bytes(16)
    gdtr: bytes = bytes(16)
    efer: int = 0
    cr0: int = 0
    cr3: int = 0
    cr4: int = 0
    msr_cr_pat: int = 0


@dataclass
class HvInputEnableVpVtl(PackedStruct):
    """HvCallEnableVpVtl (240 B): partition id, vp index u32, target vtl u8, rsvd[3], context (224 B)."""

    FORMAT: ClassVar[str] = "<QIB3x224s"
    partition_id: int = 0
    vp_index: int = 0
    target_vtl: int = 0
    context: bytes = bytes(HvInitialVpContext.SIZE)


@dataclass
class HvInputStartVirtualProcessor(PackedStruct):
    """HvCallStartVirtualProcessor (240 B): same shape as EnableVpVtl."""

    FORMAT: ClassVar[str] = "<QIBxH224s"
    partition_id: int = 0
    vp_index: int = 0
    target_vtl: int = 0
    reserved: int = 0
    context: bytes = bytes(HvInitialVpContext.SIZE)


@dataclass
class HvInputModifyVtlProtectionMask(PackedStruct):
    """HvCallModifyVtlProtectionMask header (16 B): partition id, map flags u32, HV_INPUT_VTL, rsvd[3]."""

    FORMAT: ClassVar[str] = "<QIB3x"
    partition_id: int = 0
    map_flags: int = 0
    target_vtl: int = 0


HV_GPA_PAGE_ELEMENT_SIZE = 8


@dataclass
class HvInputTranslateVirtualAddress(PackedStruct):
    """HvCallTranslateVirtualAddress (32 B): partition id, vp index u32, rsvd u32, control flags, gva page."""

    FORMAT: ClassVar[str] = "<QIIQQ"
    partition_id: int = 0
    vp_index: int = 0
    reserved: int = 0
    control_flags: int = 0
    gva_page: int = 0


@dataclass
class HvOutputTranslateVirtualAddress(PackedStruct):
    FORMAT: ClassVar[str] = "<QQ"
    translation_result: int = 0
    gpa_page: int = 0


@dataclass
class HvOutputQueryCapabilities(PackedStruct):
    FORMAT: ClassVar[str] = "<Q"
    capabilities: int = 0
