"""Classification: pixels and preprocessing (``imaging``), the ConvNet (``model``), ordered region
decoding (``regions``) and the per-series pipeline (``pipeline``) that the worker and
``dicomnode classify`` share. The trainer imports ``imaging`` and ``model`` from here: one definition."""
