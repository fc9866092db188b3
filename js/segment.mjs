// Runs an ONNX model folder with transformers.js as its documented usage does: one image, N prompts.
//
//   node js/segment.mjs FOLDER DTYPE IMAGE OUT PROMPT...
//
// Loads only from disk (remote models disabled; FOLDER's parent is the local model path). Writes the logits' raw
// float32 bytes to OUT and prints {"dims", "input_ids", "attention_mask", "pixel_values_dims"} as JSON on stdout.
import { writeFileSync } from 'node:fs';
import { basename, dirname, resolve } from 'node:path';
import { env, AutoTokenizer, AutoProcessor, CLIPSegForImageSegmentation, RawImage } from '@huggingface/transformers';

const [folder, dtype, imagePath, out, ...prompts] = process.argv.slice(2);
if (!folder || !dtype || !imagePath || !out || prompts.length === 0) {
  console.error('usage: node js/segment.mjs FOLDER DTYPE IMAGE OUT PROMPT...');
  process.exit(2);
}
env.allowRemoteModels = false;
env.allowLocalModels = true;
env.localModelPath = dirname(resolve(folder)) + '/';
const name = basename(resolve(folder));

const tokenizer = await AutoTokenizer.from_pretrained(name);
const processor = await AutoProcessor.from_pretrained(name);
const model = await CLIPSegForImageSegmentation.from_pretrained(name, { dtype });

const text_inputs = tokenizer(prompts, { padding: true, truncation: true });
const image_inputs = await processor(await RawImage.read(imagePath));
const { logits } = await model({ ...text_inputs, ...image_inputs });

writeFileSync(out, Buffer.from(logits.data.buffer, logits.data.byteOffset, logits.data.byteLength));
console.log(JSON.stringify({
  dims: logits.dims,
  input_ids: text_inputs.input_ids.tolist().map((row) => row.map(Number)),
  attention_mask: text_inputs.attention_mask.tolist().map((row) => row.map(Number)),
  pixel_values_dims: image_inputs.pixel_values.dims,
}));
