// Reads an .npz written by statedict-convert (or a single .npy) with a published .npy parser
// (npm npyjs) and prints every array it finds as JSON: member, key, dtype, shape, byte count and
// BLAKE3 of the array's bytes. The zip around the members is walked here through its central
// directory (stored members sliced out, deflated ones inflated with node:zlib); an array npyjs
// cannot parse (a dtype numpy has no name for, written as raw bytes) is listed with its error.
//
//   node read_npz.mjs FILE.npz|FILE.npy
import { readFileSync } from "node:fs";
import { inflateRawSync } from "node:zlib";
import { blake3 } from "@noble/hashes/blake3.js";
import npyjs from "npyjs";

const npy = new npyjs({ convertFloat16: false }); // float16 as its raw 16-bit words

function members(file) {
  const view = new DataView(file.buffer, file.byteOffset, file.byteLength);
  let end = file.length - 22;
  while (end >= 0 && view.getUint32(end, true) !== 0x06054b50) end -= 1;
  if (end < 0) throw new Error("no end of central directory record");
  const count = view.getUint16(end + 10, true);
  let position = view.getUint32(end + 16, true);
  const found = [];
  for (let i = 0; i < count; i += 1) {
    if (view.getUint32(position, true) !== 0x02014b50) throw new Error(`central directory entry ${i}: no signature`);
    const method = view.getUint16(position + 10, true);
    const compressed = view.getUint32(position + 20, true);
    const nameLength = view.getUint16(position + 28, true);
    const extraLength = view.getUint16(position + 30, true);
    const commentLength = view.getUint16(position + 32, true);
    const local = view.getUint32(position + 42, true);
    const name = file.subarray(position + 46, position + 46 + nameLength).toString("utf8");
    position += 46 + nameLength + extraLength + commentLength;
    const start = local + 30 + view.getUint16(local + 26, true) + view.getUint16(local + 28, true);
    const raw = file.subarray(start, start + compressed);
    found.push({ name, bytes: method === 8 ? inflateRawSync(raw) : Buffer.from(raw) });
  }
  return found;
}

function hex(bytes) {
  return Array.from(blake3(bytes), (byte) => byte.toString(16).padStart(2, "0")).join("");
}

function describe(name, bytes) {
  const buffer = bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength);
  const key = name.endsWith(".npy") ? name.slice(0, -4) : name;
  try {
    const array = npy.parse(buffer);
    // Booleans come back as JavaScript booleans, everything else as a typed array over the bytes.
    const data = Array.isArray(array.data)
      ? Uint8Array.from(array.data, (value) => (value ? 1 : 0))
      : new Uint8Array(array.data.buffer, array.data.byteOffset, array.data.byteLength);
    const found = { name, key, dtype: array.dtype, shape: array.shape, fortran: array.fortranOrder, nbytes: data.length, blake3: hex(data) };
    // statedict-convert's metadata member: JSON text as a uint8 array (the tree, digests, dtypes)
    if (key === "__sdconvert__") found.metadata = JSON.parse(new TextDecoder().decode(data));
    return found;
  } catch (error) {
    return { name, key, error: String(error.message) };
  }
}

const path = process.argv[2];
const file = readFileSync(path);
const found = path.endsWith(".npy")
  ? [describe(path.split("/").pop(), file)]
  : members(file).filter((member) => member.name.endsWith(".npy")).map((m) => describe(m.name, m.bytes));
process.stdout.write(JSON.stringify(found));
