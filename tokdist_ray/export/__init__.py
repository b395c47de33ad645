"""The expanded model written out: model.py is the export stage's work (save_model, the
folder replaced whole or not at all, new_rows.safetensors beside the model), on top of the
three writers it picks from: hf.py writes the new rows into a loaded model and saves it as
a Hugging Face folder (expand_model, save_expanded; evaluation writes rows with it too),
streamed.py writes the same folder from the original safetensors shards one at a time, so
no process holds the whole model, and gguf.py writes an exported folder as one GGUF file
for llama.cpp. The export sits beside training in the layers: neither imports the other;
what both read of weight files is vocab/weights.py."""
