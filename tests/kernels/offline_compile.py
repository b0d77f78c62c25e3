"""Compile Triton kernels for a GPU target on a machine without one (not a pytest file).

Runs Triton's whole compiler (frontend, TTGIR passes, LLVM, the bundled ptxas) for the
target, with the specialisations a real launch gets (unit strides as constants, pointers
and multiples of 16 marked divisible by 16), and prints per kernel the shared memory, the
number of asynchronous copies (software pipelining) and whether Hopper's wgmma is used.
It catches what the interpreter cannot (constructs the compiler rejects, loops that are
not pipelined) but says nothing about speed.

    python tests/kernels/offline_compile.py            # sm_90, the grouped matmul kernels
    python tests/kernels/offline_compile.py --arch 80
"""
import argparse
import importlib

import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.jit import JITFunction


def compile_for(kernel, args, consts, num_warps, num_stages, arch=90):
    """args: name -> ("ptr", dtype) or an int value (1 becomes a constant; multiples of 16
    are marked divisible); consts: the constexpr parameters."""
    fn = JITFunction(kernel.fn)
    signature, constants, attrs = {}, dict(consts), {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            signature[name] = "constexpr"
        elif isinstance(args[name], tuple):
            signature[name] = f"*{args[name][1]}"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif args[name] == 1:
            signature[name], constants[name] = "constexpr", 1
        else:
            signature[name] = "i32"
            if args[name] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = triton.compiler.ASTSource(fn, signature, constants, attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def report(label, compiled):
    ttgir = compiled.asm["ttgir"]
    print(f"{label:34s} shared {compiled.metadata.shared:7d} B  async copies "
          f"{ttgir.count('async_copy_global_to_local')}  wgmma "
          f"{'yes' if 'warp_group_dot' in ttgir else 'no'}")


def grouped_matmul_cases(arch, dtype="bf16"):
    gmm = importlib.import_module("megalite.kernels.grouped_matmul")
    K, N = 4096, 14336  # Mixtral-8x7B's up projection
    ptr = ("ptr", dtype)
    base = {"x_ptr": ptr, "w_ptr": ptr, "y_ptr": ptr, "tiles_ptr": ("ptr", "i32"),
            "num_slots": 136}
    meta = {"PREC": "tf32", "BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}
    for label, strides in [("forward, W [E, K, N]", dict(N=N, K=K, sxm=K, swk=N, swn=1)),
                           ("forward, W^T view (HF layout)", dict(N=N, K=K, sxm=K, swk=1, swn=K)),
                           ("input gradient (W^T)", dict(N=K, K=N, sxm=N, swk=1, swn=N))]:
        args = {**base, **strides, "sxk": 1, "swe": K * N}
        report(f"{dtype} {label}", compile_for(gmm._gmm_kernel, args, meta, 4, 4, arch))
    args = {"x_ptr": ptr, "dy_ptr": ptr, "dw_ptr": ptr, "offsets_ptr": ("ptr", "i32"), "N": N,
            "K": K, "sxm": K, "sxk": 1, "sdm": N, "sdn": 1, "swe": K * N, "swk": N, "swn": 1}
    meta = {"PREC": "tf32", "BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128}
    report(f"{dtype} weight gradient",
           compile_for(gmm._gmm_weight_grad_kernel, args, meta, 8, 3, arch))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80, 90")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    a = p.parse_args()
    grouped_matmul_cases(a.arch, a.dtype)
