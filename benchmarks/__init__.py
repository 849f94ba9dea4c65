"""kvlog benchmarks (the full harness is to come; see README)."""
