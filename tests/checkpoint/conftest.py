import os

# transformers must never reach for the Hugging Face hub in these tests
os.environ.setdefault("HF_HUB_OFFLINE", "1")
