"""The network: DeepLabV3+ on a ResNet (``deeplab``), the three forms of
a dilated convolution (``dilated_conv``), every bilinear resampler
(``resample``) and the FLOP count of a model (``flops``)."""
