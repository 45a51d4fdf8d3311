"""vsmtrace: record, replay and analyse Hyper-V VSM behaviour under KVM."""

__version__ = "0.1.0"
