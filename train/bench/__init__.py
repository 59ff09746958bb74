"""`crma bench NAME`: benchmarks that print what they measure, with the command and the machine.

One module per benchmark (`add_flags`, `run`), listed in `crma_jax.train.cli.BENCHMARKS`;
`util` holds what they share: the command line, the machine's description, child processes and
their peak RSS.
"""
