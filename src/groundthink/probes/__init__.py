"""Memory diagnostics: what the GDN state stores, how long it keeps it, and who reads it.

Each probe is a function of plain arrays that returns numbers and numpy arrays.
`run_probes` runs them all on one text, and `report.write_report` renders the result.
The formulas are in docs/probes.md.
"""

from .gradients import gradient_health, parameter_components
from .horizon import forget_horizon, half_life
from .needle import build_needle_sequences, needle_probe, read_snr
from .readers import focus_ratio, memory_readers, require_memory_readers, slot_entropy
from .spectrum import log_abs_det, span_check, transition_eigenvalues, transition_spectrum
from .state import effective_rank, key_interference, state_content, state_entropy, state_norm
from .suite import Needle, ProbeSettings, format_summary, run_probes
from .trace import ModelTrace, ProbeInputError, ProbeNotApplicable, trace_model
from .write import write_strength

__all__ = [
    "ModelTrace", "Needle", "ProbeInputError", "ProbeNotApplicable", "ProbeSettings",
    "build_needle_sequences", "effective_rank", "focus_ratio", "forget_horizon", "format_summary",
    "gradient_health", "half_life", "key_interference", "log_abs_det", "memory_readers",
    "needle_probe", "parameter_components", "read_snr", "require_memory_readers", "run_probes",
    "slot_entropy", "span_check", "state_content", "state_entropy", "state_norm", "trace_model",
    "transition_eigenvalues", "transition_spectrum", "write_strength",
]
