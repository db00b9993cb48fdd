import torch, time
import torch.nn.functional as F
torch.manual_seed(0)
print(torch.backends.mkl.is_available(), torch.backends.mkldnn.is_available(), torch.get_num_threads())
def bench(f, n=50):
    for _ in range(5): f()
    t = time.perf_counter()
    for _ in range(n): f()
    return (time.perf_counter() - t) / n
for (k, n) in [(576, 1536), (1536, 576), (576, 576), (576, 192), (576, 49152)]:
    w = torch.randn(n, k)
    for m in (8, 32, 64):
        x = torch.randn(m, k)
        t0 = bench(lambda: F.linear(x, w))
        res = [f"M={m:3d} {k}->{n}: linear {t0*1e3:.3f} ms ({2*m*k*n/t0/1e9:.0f} GF/s)"]
        try:
            pw = torch.ops.mkl._mkl_reorder_linear_weight(w, m)
            t1 = bench(lambda: torch.ops.mkl._mkl_linear(x, pw, w, None, m))
            assert torch.allclose(torch.ops.mkl._mkl_linear(x, pw, w, None, m), F.linear(x, w), atol=1e-3)
            res.append(f"mkl packed {t1*1e3:.3f} ms ({2*m*k*n/t1/1e9:.0f})")
        except Exception as e:
            res.append(f"mkl err {str(e)[:80]}")
        try:
            pw2 = torch.ops.mkldnn._reorder_linear_weight(w, m) if hasattr(torch.ops.mkldnn, "_reorder_linear_weight") else None
        except Exception as e:
            pw2 = None
        print("  ".join(res))
