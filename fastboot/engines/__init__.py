"""Engine adapters: how fastboot launches and talks to vLLM and SGLang."""
