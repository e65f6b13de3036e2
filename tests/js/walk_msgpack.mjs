// Reads a msgpack file written by statedict-convert with a plain, published msgpack decoder and
// prints every tensor it finds as JSON: path, shape, dtype, byte count and BLAKE3 of the bytes.
// It knows only the encoding in schemas/msgpack.md (flax's ndarray ext type 1 and chunked maps);
// statedict-convert's own ext types (80, 81) come back as opaque ExtData and are skipped.
//
//   node walk_msgpack.mjs FILE.msgpack
import { readFileSync } from "node:fs";
import { decode, ExtData } from "@msgpack/msgpack";
import { blake3 } from "@noble/hashes/blake3.js";

const NDARRAY = 1;
const CHUNKED = "__msgpack_chunked_array__";

function ndarray(ext) {
  const [shape, dtype, bytes] = decode(ext.data);
  return { shape, dtype, parts: [bytes] };
}

function describe(path, array) {
  const hash = blake3.create();
  let nbytes = 0;
  for (const part of array.parts) {
    hash.update(part);
    nbytes += part.length;
  }
  const hex = Array.from(hash.digest(), (byte) => byte.toString(16).padStart(2, "0")).join("");
  return { path, dtype: array.dtype, shape: array.shape, nbytes, blake3: hex };
}

function walk(node, path, found) {
  if (node instanceof ExtData) {
    if (node.type === NDARRAY) found.push(describe(path, ndarray(node)));
    return;
  }
  if (Array.isArray(node)) {
    node.forEach((value, index) => walk(value, [...path, index], found));
    return;
  }
  if (node !== null && typeof node === "object" && !(node instanceof Uint8Array)) {
    if (node[CHUNKED] === true) {
      const count = Object.keys(node.chunks).length;
      const chunks = Array.from({ length: count }, (_, i) => ndarray(node.chunks[String(i)]));
      const shape = Array.from({ length: Object.keys(node.shape).length }, (_, i) => node.shape[String(i)]);
      found.push(describe(path, { shape, dtype: chunks[0].dtype, parts: chunks.flatMap((c) => c.parts) }));
      return;
    }
    for (const [key, value] of Object.entries(node)) walk(value, [...path, key], found);
  }
}

const found = [];
walk(decode(readFileSync(process.argv[2])), [], found);
process.stdout.write(JSON.stringify(found) + "\n");
