"""The compression suite behind ``edgectl compress`` and ``edgectl distill``.

* ``tflite_info`` — read op codes/versions and the converter's ``min_runtime_version`` from a
  ``.tflite`` flatbuffer; decide whether a device runtime can load it (numpy + flatbuffers only).
* ``pruning`` — magnitude pruning on Keras 3 (masks + a sparsity schedule during a fine-tune).
* ``distill`` — knowledge distillation (soft teacher targets at a temperature + hard labels).
* ``select`` — pure logic: the accuracy budget, device-profile constraints, collapse diagnosis.

TensorFlow is imported lazily by the modules that train; ``import sdk`` stays light.
"""
