#!/usr/bin/env node
// A GPT-2 + LoRA adapter-file consumer in plain JavaScript (Node >= 18, no packages): the example command
// candidate of docs/conformance.md ("Command candidates"). Written by hand for reflora's tests from the HF GPT-2
// and PEFT file formats; it reads safetensors itself (safetensors.js).
//
//   node gpt2_lora.js --base DIR --adapter DIR --input FILE --out FILE [--no-scaling]
//
// The adapter is merged into the weights at load (W' = W + s·(BA)ᵀ in Conv1D layout (in, out), bias + s·b_B;
// DoRA: W' = m ⊙ (W + s·(BA)ᵀ) / ‖·‖ per output column), then a plain GPT-2 forward runs in float64. Writes
// logits, logits.<name> (each subfolder adapter alone), merged_logits and merged.<module>.weight (F64).
// --no-scaling is the faulty variant of the tests: it drops the alpha scaling (s = 1).
"use strict";
const fs = require("fs");
const path = require("path");
const { readSafetensors, writeSafetensors } = require("./safetensors");

function args() {
  const a = {}; const v = process.argv.slice(2);
  for (let i = 0; i < v.length; i++) {
    if (v[i] === "--no-scaling") a.noScaling = true; else a[v[i].slice(2)] = v[++i];
  }
  return a;
}

function patternValue(pattern, module, fallback) { // PEFT: a key matches a module name it ends with (or equals)
  for (const [key, value] of Object.entries(pattern || {}))
    if (module === key || module.endsWith("." + key) || new RegExp(`^(.*\\.)?${key}$`).test(module)) return value;
  return fallback;
}

function mergeAdapter(params, dir, noScaling) { // a copy of params with the adapter merged in; and the modules
  const cfg = JSON.parse(fs.readFileSync(path.join(dir, "adapter_config.json"), "utf8"));
  const t = readSafetensors(path.join(dir, "adapter_model.safetensors"));
  const out = Object.assign({}, params); const modules = [];
  for (const key of Object.keys(t)) {
    if (!key.endsWith(".lora_A.weight")) continue;
    const module = key.slice("base_model.model.".length, -".lora_A.weight".length); modules.push(module);
    const A = t[key], B = t[key.replace("lora_A", "lora_B")];
    const r = A.shape[0], nin = A.shape[1], nout = B.shape[0];
    const rank = patternValue(cfg.rank_pattern, module, cfg.r), alpha = patternValue(cfg.alpha_pattern, module, cfg.lora_alpha);
    const s = noScaling ? 1 : cfg.use_rslora ? alpha / Math.sqrt(rank) : alpha / rank;
    const W = params[module + ".weight"]; const w = Float64Array.from(W.data); // (in, out)
    for (let i = 0; i < nin; i++) for (let j = 0; j < nout; j++) {
      let d = 0; for (let k = 0; k < r; k++) d += B.data[j * r + k] * A.data[k * nin + i];
      w[i * nout + j] += s * d;
    }
    const b = Float64Array.from(params[module + ".bias"].data);
    const bB = t[key.replace("lora_A.weight", "lora_B.bias")];
    if (bB) for (let j = 0; j < nout; j++) b[j] += s * bB.data[j];
    const m = t[`base_model.model.${module}.lora_magnitude_vector`];
    if (m) for (let j = 0; j < nout; j++) { // DoRA: column j of (in, out) is output row j
      let nrm = 0; for (let i = 0; i < nin; i++) nrm += w[i * nout + j] ** 2;
      const f = nrm > 0 ? m.data[j] / Math.sqrt(nrm) : 0; for (let i = 0; i < nin; i++) w[i * nout + j] *= f;
    }
    out[module + ".weight"] = { shape: W.shape, data: w }; out[module + ".bias"] = { shape: [nout], data: b };
  }
  return [out, modules];
}

function conv1d(x, n, P, name) { // x (n, in) · W (in, out) + b
  const W = P[name + ".weight"], b = P[name + ".bias"].data, [nin, nout] = W.shape, y = new Float64Array(n * nout);
  for (let t = 0; t < n; t++) for (let j = 0; j < nout; j++) {
    let s = b[j]; for (let i = 0; i < nin; i++) s += x[t * nin + i] * W.data[i * nout + j]; y[t * nout + j] = s;
  }
  return y;
}

function layerNorm(x, n, c, P, name, eps) {
  const g = P[name + ".weight"].data, b = P[name + ".bias"].data, y = new Float64Array(n * c);
  for (let t = 0; t < n; t++) {
    let mu = 0, v = 0; for (let i = 0; i < c; i++) mu += x[t * c + i]; mu /= c;
    for (let i = 0; i < c; i++) v += (x[t * c + i] - mu) ** 2; v /= c;
    for (let i = 0; i < c; i++) y[t * c + i] = (x[t * c + i] - mu) / Math.sqrt(v + eps) * g[i] + b[i];
  }
  return y;
}

function gpt2(P, cfg, ids, mask, B, T) { // logits (B, T, V)
  const C = cfg.n_embd, H = cfg.n_head, D = C / H, V = cfg.vocab_size, eps = cfg.layer_norm_epsilon ?? 1e-5;
  const logits = new Float64Array(B * T * V);
  for (let bi = 0; bi < B; bi++) {
    let h = new Float64Array(T * C);
    for (let t = 0; t < T; t++) for (let i = 0; i < C; i++)
      h[t * C + i] = P["transformer.wte.weight"].data[ids[bi * T + t] * C + i] + P["transformer.wpe.weight"].data[t * C + i];
    for (let l = 0; l < cfg.n_layer; l++) {
      const pre = `transformer.h.${l}.`;
      const qkv = conv1d(layerNorm(h, T, C, P, pre + "ln_1", eps), T, P, pre + "attn.c_attn");
      const att = new Float64Array(T * C);
      for (let hd = 0; hd < H; hd++) for (let q = 0; q < T; q++) {
        const sc = new Float64Array(q + 1); let mx = -Infinity;
        for (let k = 0; k <= q; k++) {
          let s = 0; for (let d = 0; d < D; d++) s += qkv[q * 3 * C + hd * D + d] * qkv[k * 3 * C + C + hd * D + d];
          sc[k] = mask[bi * T + k] ? s / Math.sqrt(D) : -1e30; mx = Math.max(mx, sc[k]);
        }
        let z = 0; for (let k = 0; k <= q; k++) { sc[k] = Math.exp(sc[k] - mx); z += sc[k]; }
        for (let d = 0; d < D; d++) {
          let s = 0; for (let k = 0; k <= q; k++) s += sc[k] * qkv[k * 3 * C + 2 * C + hd * D + d]; att[q * C + hd * D + d] = s / z;
        }
      }
      const a = conv1d(att, T, P, pre + "attn.c_proj"); for (let i = 0; i < T * C; i++) h[i] += a[i];
      const f = conv1d(layerNorm(h, T, C, P, pre + "ln_2", eps), T, P, pre + "mlp.c_fc");
      for (let i = 0; i < f.length; i++) f[i] = 0.5 * f[i] * (1 + Math.tanh(Math.sqrt(2 / Math.PI) * (f[i] + 0.044715 * f[i] ** 3)));
      const m = conv1d(f, T, P, pre + "mlp.c_proj"); for (let i = 0; i < T * C; i++) h[i] += m[i];
    }
    h = layerNorm(h, T, C, P, "transformer.ln_f", eps);
    for (let t = 0; t < T; t++) for (let v = 0; v < V; v++) {
      let s = 0; for (let i = 0; i < C; i++) s += h[t * C + i] * P["transformer.wte.weight"].data[v * C + i];
      logits[(bi * T + t) * V + v] = s;
    }
  }
  return { shape: [B, T, V], data: logits };
}

function main() {
  const a = args();
  const cfg = JSON.parse(fs.readFileSync(path.join(a.base, "config.json"), "utf8"));
  const params = readSafetensors(path.join(a.base, "model.safetensors"));
  const input = readSafetensors(a.input);
  const [B, T] = input.input_ids.shape, ids = input.input_ids.data, mask = input.attention_mask.data;
  const [merged, modules] = mergeAdapter(params, a.adapter, a.noScaling);
  const out = { logits: gpt2(merged, cfg, ids, mask, B, T) };
  out.merged_logits = out.logits;
  for (const m of modules) out[`merged.${m}.weight`] = merged[m + ".weight"];
  for (const name of fs.readdirSync(a.adapter)) {
    const sub = path.join(a.adapter, name);
    if (fs.existsSync(path.join(sub, "adapter_config.json")))
      out[`logits.${name}`] = gpt2(mergeAdapter(params, sub, a.noScaling)[0], cfg, ids, mask, B, T);
  }
  writeSafetensors(a.out, out);
}

main();
