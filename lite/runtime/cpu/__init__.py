"""The runtime's CPU kernel choices: the CPU plan (`plan.py`, probed in `probes.py`), threads (`threads.py`), and the
hooks that apply it to a model (`compute.py`, `prepack.py`, `row_gemv.py`, installed by `install.py`)."""
