"""LoRA on an instruct model, rendered with the model's own chat template (README: instruct models).

    python train.py experiments/lora_instruct.py
    python train.py experiments/lora_instruct.py --model=HuggingFaceTB/SmolLM2-360M-Instruct --out_dir=out/smol_lora
"""
MODEL = "Qwen/Qwen2.5-0.5B-Instruct"
FORMAT = "chat_template"
LORA_R = 16
LEARNING_RATE = 2e-4  # LoRA's adapters want a higher rate than full fine-tuning
EPOCHS = 2
OUT_DIR = "out/lora_instruct"
