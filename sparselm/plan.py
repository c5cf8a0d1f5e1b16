"""Entry point: ``python -m sparselm.plan --config NAME --gpus N [--search] [--section.key=value ...]``.

Per-rank memory and step time of a layout before any GPU is spent; the logic is in ``sparselm.planning``.
"""
from sparselm.planning.report import main

if __name__ == "__main__":
    main()
