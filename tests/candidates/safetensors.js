// safetensors read / write in plain Node.js (no packages), shared by the example command candidates
// (gpt2_lora.js, lora_layer.js). Written by hand from the safetensors format: an 8-byte little-endian header
// length, a JSON header {name: {dtype, shape, data_offsets}, "__metadata__": {string: string}}, then the data.
"use strict";
const fs = require("fs");

function f16(h) { // IEEE half -> double
  const s = h & 0x8000 ? -1 : 1, e = (h >> 10) & 0x1f, m = h & 0x3ff;
  if (e === 0) return s * m * 2 ** -24;
  if (e === 31) return m ? NaN : s * Infinity;
  return s * (1 + m / 1024) * 2 ** (e - 15);
}

// {tensors: {name: {shape, data: Float64Array}}, metadata: {string: string}}; F64/F32/F16/BF16/I64 read as doubles
function read(file) {
  const buf = fs.readFileSync(file);
  const n = Number(buf.readBigUInt64LE(0));
  const header = JSON.parse(buf.subarray(8, 8 + n).toString("utf8"));
  const tensors = {}; const base = 8 + n;
  for (const [name, t] of Object.entries(header)) {
    if (name === "__metadata__") continue;
    const [b, e] = t.data_offsets; const raw = buf.subarray(base + b, base + e);
    const count = t.shape.reduce((x, y) => x * y, 1); let data;
    if (t.dtype === "F64") { data = new Float64Array(count); for (let i = 0; i < count; i++) data[i] = raw.readDoubleLE(8 * i); }
    else if (t.dtype === "F32") { data = new Float64Array(count); for (let i = 0; i < count; i++) data[i] = raw.readFloatLE(4 * i); }
    else if (t.dtype === "F16") { data = new Float64Array(count); for (let i = 0; i < count; i++) data[i] = f16(raw.readUInt16LE(2 * i)); }
    else if (t.dtype === "BF16") { data = new Float64Array(count); const b4 = Buffer.alloc(4); for (let i = 0; i < count; i++) { b4.writeUInt32LE(raw.readUInt16LE(2 * i) << 16 >>> 0, 0); data[i] = b4.readFloatLE(0); } }
    else if (t.dtype === "I64") { data = new Float64Array(count); for (let i = 0; i < count; i++) data[i] = Number(raw.readBigInt64LE(8 * i)); }
    else throw new Error(`${file}: ${name} has dtype ${t.dtype}, not supported`);
    tensors[name] = { shape: t.shape, data };
  }
  return { tensors, metadata: header.__metadata__ || {} };
}

function readSafetensors(file) { // {name: {shape, data: Float64Array}}
  return read(file).tensors;
}

function writeSafetensors(file, tensors, metadata) { // {name: {shape, data}} as F64; metadata: {string: string}
  const header = {}; let offset = 0;
  if (metadata) header.__metadata__ = metadata;
  for (const [name, t] of Object.entries(tensors)) {
    header[name] = { dtype: "F64", shape: t.shape, data_offsets: [offset, offset + 8 * t.data.length] };
    offset += 8 * t.data.length;
  }
  let json = JSON.stringify(header); while ((8 + Buffer.byteLength(json)) % 8) json += " ";
  const size = Buffer.byteLength(json);
  const buf = Buffer.alloc(8 + size + offset);
  buf.writeBigUInt64LE(BigInt(size), 0); buf.write(json, 8, "utf8");
  let p = 8 + size;
  for (const t of Object.values(tensors)) for (const x of t.data) { buf.writeDoubleLE(x, p); p += 8; }
  fs.writeFileSync(file, buf);
}

module.exports = { read, readSafetensors, writeSafetensors };
