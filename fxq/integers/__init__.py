"""Integer arithmetic and the ranges that choose it: the affine maps, fixed-point requantization,
the int8 GEMM backends, bit packing, the float64 reference, the observers and the range and
rounding rules.
"""
