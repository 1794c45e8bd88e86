"""The latent loader as it was before the rewrite of issue #15 item 5 (igscale/latents/loader.py and reader.py at
commit 060b17f, with the member-by-member tar parser it fell back to), kept so that bench/bench_loader.py measures
before and after side by side in one run. Bench-only code: nothing in igscale imports it."""
