"""The benchmarks of ``forecast bench``: each builds the system through the wiring of
``forecast up`` (:mod:`forecast.runtime`) and reports what it measured. Nothing but the
``forecast bench`` commands imports this package."""
