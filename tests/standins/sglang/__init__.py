"""A stand-in for SGLang's server (the real one is not installable on the CPU machines), used by
tests/integration/test_serve_sglang.py to drive fastboot's SGLang adapter through a real
`fastboot serve` cycle with real CRIU. Only the routes fastboot and an OpenAI client use."""
