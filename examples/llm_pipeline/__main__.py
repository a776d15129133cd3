"""``python -m examples.llm_pipeline``: the demo (see ``--help``)."""

from examples.llm_pipeline.runner import main

if __name__ == "__main__":
    main()
