"""Runtime: predict → explain → compress on frames and streams (no torch needed).

Example:
    >>> import numpy as np, tempfile
    >>> from keepbits.runtime import Pipeline
    >>> from keepbits.runtime.synthetic import toy_bundle
    >>> pipe = Pipeline.from_bundle(toy_bundle(tempfile.mkdtemp() + "/b"))
    >>> pipe(np.full((20, 20, 3), 255, np.uint8)).label
    'bright'
"""
from keepbits.runtime.pipeline import BACKENDS, Pipeline, Result
from keepbits.runtime.queues import BoundedQueue, QueueClosed
from keepbits.runtime.sources import Frame, Source, open_source

__all__ = ["BACKENDS", "Pipeline", "Result", "BoundedQueue", "QueueClosed", "Frame", "Source", "open_source"]
