"""Triton backend of resnet_fused: implicit-GEMM conv kernels with the epilogue and its backward fused.

``resnet_fused.triton.op`` registers ``resnet_fused::conv_bias_add_relu_triton`` and its backward; the backend table
(:mod:`resnet_fused.backends`) imports it when Triton can run here (a GPU, or ``TRITON_INTERPRET=1``).
"""
