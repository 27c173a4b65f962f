"""Run directories: every file and folder name of a run, and what depends on them (`layout.py`: `RunDir`,
`EvalDir`)."""
