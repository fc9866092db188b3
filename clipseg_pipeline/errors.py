"""The one exception family of the pipeline."""


class PipelineError(Exception):
    """An expected failure: bad input, bad params, an unreachable source. Its message says what, where and what to do."""
