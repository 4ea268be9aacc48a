"""edgectl's workstation side: compression, bundles, pushing and fleet queries.

Importing ``sdk`` is cheap: TensorFlow is imported only by the modules that convert models.
"""

__version__ = "0.1.0"
