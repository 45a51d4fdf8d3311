"""KVM layer: cffi bindings over <linux/kvm.h> and safe wrappers (system, VM, vCPU)."""

from vsmtrace.vmm.kvm.system import Kvm, KvmError, KvmUnavailable, Vcpu, Vm

__all__ = ["Kvm", "KvmError", "KvmUnavailable", "Vcpu", "Vm"]
