"""`--batch-size auto`: today's 16 on CPU, by device memory and width on GPU."""


class _FakeGpu:
    def __init__(self, gib):
        self.gib = gib

    def memory_stats(self):
        return None if self.gib is None else {"bytes_limit": int(self.gib * 2**30)}


def test_batch_size_auto_is_16_on_cpu_and_by_memory_on_gpu(monkeypatch):
    import jax

    from trainer.config import resolve_batch_size

    assert resolve_batch_size(24) == 24
    assert resolve_batch_size("auto") == 16  # this test runs on CPU: today's default kept
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    for gib, devices, base, expected in [(79.2, 1, 32, 128), (139.8, 1, 32, 128), (79.2, 1, 64, 64),
                                         (22.0, 1, 32, 32), (79.2, 2, 32, 256), (6.0, 1, 64, 16), (None, 1, 32, 64)]:
        monkeypatch.setattr(jax, "local_devices", lambda: [_FakeGpu(gib)] * devices)
        assert resolve_batch_size("auto", base) == expected, (gib, devices, base)
