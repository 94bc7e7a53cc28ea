#!/usr/bin/env node
// One LoRA layer in plain JavaScript (Node >= 18, no packages): the example layer-level command candidate of
// docs/conformance.md ("Command candidates", "Layer level"). Written by hand for reflora's tests from that section
// alone (the {case} / {out} file layout and the LoRA formulas it states), not translated from reflora's code.
//
//   node lora_layer.js --case FILE --out FILE [--no-scaling | --transpose-square-bug]
//
// Both layouts (linear W (out, in): y = x Wᵀ; conv1d W (in, out): y = x W), forward and backward from dy, the
// scaling s = alpha/r (alpha/√r under rsLoRA), dropout with the injected keep-mask (x ⊙ M / (1 − p) on the LoRA
// branch), per-slice q/k/v branches, a trainable bias, lora_bias (s·b_B), DoRA (detached or full norm), merge and
// unmerge (DoRA too); everything in float64. Its capabilities are in lora_layer.caps.json. Faulty variants for
// the tests: --no-scaling drops s (s = 1); --transpose-square-bug merges (BA) untransposed into a square conv1d
// weight (the bug a library makes when it tests the shape instead of the layout).
"use strict";
const { read, writeSafetensors } = require("./safetensors");

const argv = process.argv.slice(2);
const opt = {};
for (let i = 0; i < argv.length; i++) {
  if (argv[i] === "--no-scaling" || argv[i] === "--transpose-square-bug") opt[argv[i].slice(2)] = true;
  else opt[argv[i].slice(2)] = argv[++i];
}

const { tensors: t, metadata } = read(opt.case);
const meta = {};
for (const [k, v] of Object.entries(metadata)) meta[k] = JSON.parse(v);
if (meta.format !== "reflora-layer-case/1") { console.error(`unknown case format ${meta.format}`); process.exit(2); }
if (meta.dtype !== "float64") { console.error(`dtype ${meta.dtype}: this layer computes in float64 only`); process.exit(3); }

const linear = meta.layout === "linear";
const [B_, T_, nin] = t.x.shape; const N = B_ * T_;
const nout = t.dy.shape[2];
const s = opt["no-scaling"] ? 1 : (meta.use_rslora ? meta.lora_alpha / Math.sqrt(meta.r) : meta.lora_alpha / meta.r);
const W = t.weight.data;
const w = (i, o) => (linear ? W[o * nin + i] : W[i * nout + o]); // the weight as (in, out)
const x = t.x.data, dy = t.dy.data;

// the branches: {name, A (r, in), B (width, r), start, width}; a q/k/v slice covers [i·out/3, (i+1)·out/3)
const slices = meta.slices || [null];
const width = meta.slices ? nout / 3 : nout;
const branches = slices.map((name) => {
  const suffix = name === null ? "" : `.${name}`;
  const A = t[`lora_A${suffix}`], Bm = t[`lora_B${suffix}`];
  return { suffix, A: A.data, B: Bm.data, r: A.shape[0], start: name === null ? 0 : "qkv".indexOf(name) * width, width };
});

function zeros(n) { return new Float64Array(n); }

// dV (out, in) of the delta s·B A, per output row o and input i (0 outside a slice)
function delta() {
  const d = zeros(nout * nin);
  for (const br of branches)
    for (let o = 0; o < br.width; o++)
      for (let i = 0; i < nin; i++) {
        let acc = 0;
        for (let k = 0; k < br.r; k++) acc += br.B[o * br.r + k] * br.A[k * nin + i];
        d[(br.start + o) * nin + i] += s * acc;
      }
  return d;
}

function forwardBackward() {
  const mask = t.keep_mask ? t.keep_mask.data : null;
  const keep = mask ? 1 / (1 - meta.lora_dropout) : 1;
  const xd = zeros(N * nin); // the LoRA branch's input
  for (let j = 0; j < N * nin; j++) xd[j] = mask ? x[j] * mask[j] * keep : x[j];
  const z = zeros(N * nout); // x Wᵀ + s·B A x_d (+ s·b_B), before the bias and DoRA's scale
  for (let n = 0; n < N; n++)
    for (let o = 0; o < nout; o++) {
      let acc = 0;
      for (let i = 0; i < nin; i++) acc += x[n * nin + i] * w(i, o);
      z[n * nout + o] = acc;
    }
  const us = branches.map((br) => { // u = x_d Aᵀ (N, r)
    const u = zeros(N * br.r);
    for (let n = 0; n < N; n++)
      for (let k = 0; k < br.r; k++) {
        let acc = 0;
        for (let i = 0; i < nin; i++) acc += xd[n * nin + i] * br.A[k * nin + i];
        u[n * br.r + k] = acc;
      }
    for (let n = 0; n < N; n++)
      for (let o = 0; o < br.width; o++) {
        let acc = 0;
        for (let k = 0; k < br.r; k++) acc += u[n * br.r + k] * br.B[o * br.r + k];
        z[n * nout + br.start + o] += s * acc;
      }
    return u;
  });
  const bB = t.lora_bias_B ? t.lora_bias_B.data : null;
  if (bB) for (let n = 0; n < N; n++) for (let o = 0; o < nout; o++) z[n * nout + o] += s * bB[o];
  // DoRA: y = m ⊙ z / ‖V‖_row + b with V = W + s·B A (out, in), one full-width branch, no dropout
  const m = t.magnitude ? t.magnitude.data : null;
  let norm = null, V = null;
  if (m) {
    V = delta(); norm = zeros(nout);
    for (let o = 0; o < nout; o++) {
      let acc = 0;
      for (let i = 0; i < nin; i++) { V[o * nin + i] += w(i, o); acc += V[o * nin + i] ** 2; }
      norm[o] = Math.sqrt(acc);
    }
  }
  const scale = (o) => (m ? m[o] / norm[o] : 1);
  const y = zeros(N * nout);
  for (let n = 0; n < N; n++)
    for (let o = 0; o < nout; o++) y[n * nout + o] = scale(o) * z[n * nout + o] + (t.bias ? t.bias.data[o] : 0);

  // backward: dz = dy ⊙ scale; dx = dz W (+ the branch's s·(dz B) A ⊙ M / (1 − p)); dA, dB, db_B, dm, d bias
  const dz = zeros(N * nout);
  for (let n = 0; n < N; n++) for (let o = 0; o < nout; o++) dz[n * nout + o] = dy[n * nout + o] * scale(o);
  const dx = zeros(N * nin);
  for (let n = 0; n < N; n++)
    for (let i = 0; i < nin; i++) {
      let acc = 0;
      for (let o = 0; o < nout; o++) acc += dz[n * nout + o] * w(i, o);
      dx[n * nin + i] = acc;
    }
  const out = {};
  const trainable = [];
  branches.forEach((br, b) => {
    const u = us[b];
    const g = zeros(N * br.r); // dz B (N, r) over the slice
    for (let n = 0; n < N; n++)
      for (let k = 0; k < br.r; k++) {
        let acc = 0;
        for (let o = 0; o < br.width; o++) acc += dz[n * nout + br.start + o] * br.B[o * br.r + k];
        g[n * br.r + k] = acc;
      }
    const dA = zeros(br.r * nin), dB = zeros(br.width * br.r);
    for (let k = 0; k < br.r; k++)
      for (let i = 0; i < nin; i++) {
        let acc = 0;
        for (let n = 0; n < N; n++) acc += g[n * br.r + k] * xd[n * nin + i];
        dA[k * nin + i] = s * acc;
      }
    for (let o = 0; o < br.width; o++)
      for (let k = 0; k < br.r; k++) {
        let acc = 0;
        for (let n = 0; n < N; n++) acc += dz[n * nout + br.start + o] * u[n * br.r + k];
        dB[o * br.r + k] = s * acc;
      }
    for (let n = 0; n < N; n++)
      for (let i = 0; i < nin; i++) {
        let acc = 0;
        for (let k = 0; k < br.r; k++) acc += g[n * br.r + k] * br.A[k * nin + i];
        dx[n * nin + i] += s * acc * (mask ? mask[n * nin + i] * keep : 1);
      }
    out[`lora_A${br.suffix}`] = { shape: [br.r, nin], data: dA };
    out[`lora_B${br.suffix}`] = { shape: [br.width, br.r], data: dB };
    trainable.push(`lora_A${br.suffix}`, `lora_B${br.suffix}`);
  });
  if (bB) {
    const db = zeros(nout);
    for (let n = 0; n < N; n++) for (let o = 0; o < nout; o++) db[o] += s * dz[n * nout + o];
    out.lora_B_bias = { shape: [nout], data: db }; trainable.push("lora_B_bias");
  }
  if (m) {
    const dm = zeros(nout), dnorm = zeros(nout);
    for (let n = 0; n < N; n++)
      for (let o = 0; o < nout; o++) {
        dm[o] += dy[n * nout + o] * z[n * nout + o] / norm[o];
        dnorm[o] -= dy[n * nout + o] * m[o] * z[n * nout + o] / norm[o] ** 2;
      }
    out.magnitude = { shape: [nout], data: dm }; trainable.push("magnitude");
    if (meta.dora_norm === "full") { // ‖V‖ differentiated too: dV = dnorm · V / ‖V‖, V = W + s·B A
      const br = branches[0], dA = out.lora_A.data, dB = out.lora_B.data;
      for (let o = 0; o < nout; o++)
        for (let i = 0; i < nin; i++) {
          const dv = s * dnorm[o] * V[o * nin + i] / norm[o];
          for (let k = 0; k < br.r; k++) {
            dB[o * br.r + k] += dv * br.A[k * nin + i];
            dA[k * nin + i] += br.B[o * br.r + k] * dv;
          }
        }
    }
  }
  if (meta.bias_trainable) {
    const db = zeros(nout);
    for (let n = 0; n < N; n++) for (let o = 0; o < nout; o++) db[o] += dy[n * nout + o];
    out.bias = { shape: [nout], data: db }; trainable.push("bias");
  }
  out.y = { shape: [B_, T_, nout], data: y };
  out.dx = { shape: [B_, T_, nin], data: dx };
  return { out, trainable };
}

function merge() {
  const d = delta(); // (out, in)
  const merged = Float64Array.from(W);
  const at = (o, i) => (linear || (opt["transpose-square-bug"] && nin === nout) ? o * nin + i : i * nout + o);
  const c = zeros(nout).fill(1); // DoRA: merged = m ⊙ V / ‖V‖_row = c ⊙ V per output row
  if (t.magnitude) {
    for (let o = 0; o < nout; o++) {
      let acc = 0;
      for (let i = 0; i < nin; i++) acc += (w(i, o) + d[o * nin + i]) ** 2;
      c[o] = t.magnitude.data[o] / Math.sqrt(acc);
    }
  }
  for (let o = 0; o < nout; o++)
    for (let i = 0; i < nin; i++) merged[at(o, i)] = c[o] * (merged[at(o, i)] + d[o * nin + i]);
  const y = zeros(N * nout);
  for (let n = 0; n < N; n++)
    for (let o = 0; o < nout; o++) {
      let acc = t.bias ? t.bias.data[o] : 0;
      for (let i = 0; i < nin; i++) acc += x[n * nin + i] * merged[linear ? o * nin + i : i * nout + o];
      y[n * nout + o] = acc;
    }
  const unmerged = Float64Array.from(merged); // unmerge: W = merged / c − s·B A
  for (let o = 0; o < nout; o++)
    for (let i = 0; i < nin; i++) unmerged[at(o, i)] = merged[at(o, i)] / c[o] - d[o * nin + i];
  return {
    merged_weight: { shape: t.weight.shape, data: merged },
    merged_y: { shape: [B_, T_, nout], data: y },
    unmerged_weight: { shape: t.weight.shape, data: unmerged },
  };
}

if (meta.method === "layer_forward_backward") {
  if (t.magnitude && (t.lora_bias_B || t.keep_mask || meta.slices)) {
    console.error("DoRA with lora_bias, dropout or q/k/v slices is not implemented here");
    process.exit(3);
  }
  const { out, trainable } = forwardBackward();
  writeSafetensors(opt.out, out, { trainable: JSON.stringify(trainable) });
} else if (meta.method === "layer_merge") {
  writeSafetensors(opt.out, merge());
} else {
  console.error(`method ${meta.method} is not supported`);
  process.exit(3);
}
