// Z-Image canvas extension: size presets on empty-latent nodes; on the sampler, the variant preset (turbo / base
// set steps and cfg), which preset applies, and warnings for settings that give a bad image; the seed / steps /
// time of each run drawn next to the sampler and save nodes.
//
// Written against ComfyUI's long-standing extension surface only (app.registerExtension, node prototypes'
// onDrawForeground / onConfigure, widgets, api "executed" events), and every optional piece is guarded, so a
// frontend that lacks one loses that feature, never the canvas. Hooks touch only the node types named here.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const SAMPLER = "ZImageTurboSampler";
const SAVE = "ZImageTurboSaveImage";
const SIZE = "ZImageTurboSize";
const INPAINT = "ZImageInpaintEncode";
const EMPTY_LATENTS = new Set(["EmptyLatentImage", "EmptySD3LatentImage"]);
const PRESET_WIDGET = "Z-Image size";
const CUSTOM = "custom";
export const CFG_HINT = "Turbo is distilled for cfg 1: above 1 doubles time and burns the image";
export const BASE_STEPS_HINT = "Base needs 30-50 steps, or the Fun distill LoRA for 8";

// Same table as nodes/sampling.py (VARIANTS): what picking a variant writes into steps and cfg; and, shown beside
// it, the sampler ComfyUI's official Z-Image template of that variant uses (TEMPLATE_SAMPLERS there).
export const VARIANTS = { turbo: { steps: 8, cfg: 1, label: "Turbo", template: "res_multistep" },
                          base: { steps: 50, cfg: 4, label: "Base", template: "res_multistep" } };

// The warnings nodes/sampling.py (variant_warnings) gives after a run, here while the values are edited.
export function variantWarnings(variant, steps, cfg, hasLora) {
    const found = [];
    if ((variant ?? "turbo") === "turbo" && cfg > 1) found.push(`cfg ${cfg}: ${CFG_HINT}`);
    if (variant === "base" && steps <= 8 && !hasLora) found.push(`${steps} steps: ${BASE_STEPS_HINT}`);
    return found;
}

// "Base preset: 50 steps · cfg 4 (template: res_multistep)", with "(edited)" when steps or cfg differ from it.
export function variantNote(variant, steps, cfg) {
    const preset = VARIANTS[variant ?? "turbo"];
    if (!preset) return "";
    const edited = steps !== preset.steps || cfg !== preset.cfg ? " (edited)" : "";
    return `${preset.label} preset: ${preset.steps} steps · cfg ${preset.cfg}${edited} · ComfyUI's template ` +
        `samples with ${preset.template}`;
}

// Same table and rounding as nodes/image.py (ASPECTS, BASES, preset_size): about base² pixels, sides ÷16.
const ASPECTS = [["1:1", 1, 1], ["4:3", 4, 3], ["3:4", 3, 4], ["3:2", 3, 2], ["2:3", 2, 3], ["16:9", 16, 9],
                 ["9:16", 9, 16], ["21:9", 21, 9]];
const BASES = [1024, 1280, 1536];

export function presetSize(a, b, base) {
    const width = Math.sqrt((base * base * a) / b);
    const height = (width * b) / a;
    return [Math.round(width / 16) * 16, Math.round(height / 16) * 16];
}

export const PRESETS = BASES.flatMap((base) => ASPECTS.map(([name, a, b]) => {
    const [w, h] = presetSize(a, b, base);
    return { label: `${w}×${h} (${name})`, width: w, height: h, aspect: name, base };
}));

const widget = (node, name) => node?.widgets?.find((w) => w.name === name);

function setWidget(node, name, value) {
    const w = widget(node, name);
    if (!w) return false;
    w.value = value;
    try { w.callback?.(value, app.canvas, node); } catch (e) { console.warn("[Z-Image]", e); }
    return true;
}

function redraw(node) {
    (node?.graph ?? app.graph)?.setDirtyCanvas?.(true, true);
}

// ---- (a) size presets --------------------------------------------------------------------------------

function matchingPreset(node) {
    const w = widget(node, "width")?.value, h = widget(node, "height")?.value;
    return PRESETS.find((p) => p.width === w && p.height === h)?.label ?? CUSTOM;
}

export function applyPreset(node, label) {
    const preset = PRESETS.find((p) => p.label === label);
    if (!preset) return false;
    setWidget(node, "width", preset.width);
    setWidget(node, "height", preset.height);
    const combo = widget(node, PRESET_WIDGET);
    if (combo) combo.value = preset.label;
    redraw(node);
    return true;
}

function addPresetCombo(node) {
    if (widget(node, PRESET_WIDGET) || typeof node.addWidget !== "function") return;
    // Not saved in the workflow (serialize) nor sent to the server (options.serialize): core nodes keep
    // exactly their own widgets_values and API inputs, and old workflows load unchanged.
    const combo = node.addWidget("combo", PRESET_WIDGET, matchingPreset(node),
                                 (value) => applyPreset(node, value),
                                 { values: [CUSTOM, ...PRESETS.map((p) => p.label)], serialize: false });
    combo.serialize = false;
    const size = node.computeSize?.();
    if (size && node.size && node.size[1] < size[1]) node.setSize?.([Math.max(node.size[0], size[0]), size[1]]);
}

// The pack's Size node: the size it will make, from its preset (aspect, base) or, with aspect "custom",
// from its width/height inputs.
function sizeNodeSize(node) {
    const aspect = widget(node, "aspect")?.value;
    const preset = ASPECTS.find(([n]) => n === aspect);
    if (preset) {
        const base = Number(widget(node, "base")?.value);
        return base ? presetSize(preset[1], preset[2], base) : null;
    }
    const w = Number(widget(node, "width")?.value), h = Number(widget(node, "height")?.value);
    return w && h ? [w, h] : null;
}

// Picking a preset also writes its size into width/height (when the node has them), so switching to
// "custom" starts from the size last shown rather than from a stale one. Only on a user's change: loading
// a workflow leaves its values alone.
function followPresets(node) {
    for (const name of ["aspect", "base"]) {
        const w = widget(node, name);
        if (!w || !widget(node, "width") || !widget(node, "height")) continue;
        const original = w.callback;
        w.callback = function (...args) {
            const result = original?.apply(this, args);
            const size = widget(node, "aspect")?.value === CUSTOM ? null : sizeNodeSize(node);
            if (size) {
                widget(node, "width").value = size[0];
                widget(node, "height").value = size[1];
            }
            redraw(node);
            return result;
        };
    }
}

// ---- (b) the sampler's variant preset -----------------------------------------------------------------

// A LoRA anywhere up the sampler's MODEL chain is taken for the Fun distill LoRA (a file carries no tag; the
// server does the same with the model's weight patches).
export function modelHasLora(node, seen = new Set()) {
    if (!node || seen.has(node.id) || seen.size > 64) return false;
    seen.add(node.id);
    for (let i = 0; i < (node.inputs?.length ?? 0); i++) {
        if (node.inputs[i]?.type !== "MODEL") continue;
        const up = node.getInputNode?.(i);
        if (!up) continue;
        if (/lora/i.test(String(up.comfyClass ?? up.type ?? ""))) return true;
        if (modelHasLora(up, seen)) return true;
    }
    return false;
}

export function applyVariant(node, variant) {
    const preset = VARIANTS[variant];
    if (!preset) return false;
    setWidget(node, "steps", preset.steps);
    setWidget(node, "cfg", preset.cfg);
    redraw(node);
    return true;
}

// Only a user's change of the combo applies the preset: loading a workflow keeps its steps and cfg.
function followVariant(node) {
    const w = widget(node, "variant");
    if (!w) return;
    const original = w.callback;
    w.callback = function (value, ...rest) {
        const result = original?.apply(this, [value, ...rest]);
        applyVariant(node, value);
        return result;
    };
}

// ---- drawing helpers -----------------------------------------------------------------------------------

function drawTag(ctx, text, x, y, colors) {
    ctx.save();
    ctx.font = "12px Arial, sans-serif";
    const width = ctx.measureText(text).width + 12;
    ctx.fillStyle = colors.fill;
    ctx.strokeStyle = colors.stroke;
    ctx.beginPath();
    if (ctx.roundRect) ctx.roundRect(x, y, width, 20, 4); else ctx.rect(x, y, width, 20);
    ctx.fill();
    ctx.stroke();
    ctx.fillStyle = colors.text;
    ctx.textBaseline = "middle";
    ctx.textAlign = "left";
    ctx.fillText(text, x + 6, y + 10);
    ctx.restore();
}

const WARN = { fill: "#5a1e1e", stroke: "#e05050", text: "#ffd6d6" };
const INFO = { fill: "#1e3a2a", stroke: "#4caf74", text: "#d8f5e2" };
const NOTE = { fill: "#26323f", stroke: "#5b7a99", text: "#dbe7f3" };

function titleHeight() {
    return globalThis.LiteGraph?.NODE_TITLE_HEIGHT ?? 30;
}

function state(node) {
    return (node.zimage ??= { cfgHint: false, warnings: [], variantNote: "", status: "", sizeText: "" });
}

// ---- (c) run info: formatting ------------------------------------------------------------

export function formatRun(info) {
    if (!info) return "";
    const parts = [];
    if (info.seed !== undefined) parts.push(`seed ${info.seed}`);
    if (info.steps !== undefined) parts.push(`${info.steps} steps`);
    if (info.seconds !== undefined) parts.push(`${Number(info.seconds).toFixed(1)} s`);
    if (info.width && info.height) parts.push(`${info.width}×${info.height}`);
    if (info.compiled) parts.push("compiled");
    return parts.join(" · ");
}

function drawRunInfo(node, ctx) {
    const s = state(node);
    if (!s.status || node.flags?.collapsed) return;
    drawTag(ctx, s.status, 0, node.size[1] + 6, INFO);
}

// "12" for a node of the main graph; "5:12" for node 12 inside subgraph node 5 (newer frontends).
function nodeByExecutionId(id) {
    let graph = app.graph, node = null;
    for (const part of id.split(":")) {
        if (!graph?.getNodeById) return null;
        node = graph.getNodeById(Number(part)) ?? graph.getNodeById(part);
        graph = node?.subgraph;
    }
    return node;
}

// The last sampler run per prompt, so a save node can show the time the sampler took.
const samplerRuns = new Map();

function onExecuted(event) {
    const detail = event?.detail;
    const info = detail?.output?.zimage?.[0];
    if (!info || !app.graph?.getNodeById) return;
    const node = nodeByExecutionId(String(detail.display_node ?? detail.node ?? ""));
    if (node?.comfyClass === SAMPLER || node?.type === SAMPLER) {
        samplerRuns.set(detail.prompt_id, info);
        if (samplerRuns.size > 50) samplerRuns.delete(samplerRuns.keys().next().value);
    }
    if (!node) return;
    const merged = { ...(samplerRuns.get(detail.prompt_id) ?? {}), ...info };
    state(node).status = formatRun(merged);
    state(node).info = merged;
    state(node).runWarnings = Array.isArray(info.warnings) ? info.warnings : [];
    redraw(node);
}

// ---- registration --------------------------------------------------------------------------------------

function chain(proto, name, fn) {
    const original = proto[name];
    proto[name] = function (...args) {
        const result = original?.apply(this, args);
        try { fn.apply(this, args); } catch (e) { console.warn("[Z-Image]", name, e); }
        return result;
    };
}

app.registerExtension({
    name: "ZImageTurbo.Canvas",

    setup() {
        api?.addEventListener?.("executed", onExecuted);
    },

    async beforeRegisterNodeDef(nodeType, nodeData) {
        const name = nodeData?.name;
        const proto = nodeType?.prototype;
        if (!proto) return;
        if (name === SAMPLER) {
            chain(proto, "onDrawForeground", function (ctx) {
                const cfg = Number(widget(this, "cfg")?.value);
                const steps = Number(widget(this, "steps")?.value);
                const variant = widget(this, "variant")?.value ?? "turbo";
                const s = state(this);
                s.warnings = variantWarnings(variant, steps, cfg, modelHasLora(this));
                s.cfgHint = s.warnings.some((w) => w.includes(CFG_HINT));
                s.variantNote = variantNote(variant, steps, cfg);
                if (!this.flags?.collapsed) {
                    // warnings stacked upwards from just above the title, the preset note above them
                    let y = -titleHeight() - 26;
                    for (const text of s.warnings) {
                        drawTag(ctx, `⚠ ${text}`, 0, y, WARN);
                        y -= 24;
                    }
                    if (s.variantNote) drawTag(ctx, s.variantNote, 0, y, NOTE);
                }
                drawRunInfo(this, ctx);
            });
        } else if (name === SAVE) {
            chain(proto, "onDrawForeground", function (ctx) { drawRunInfo(this, ctx); });
        } else if (name === SIZE) {
            chain(proto, "onDrawForeground", function (ctx) {
                const size = sizeNodeSize(this);
                if (!size || this.flags?.collapsed) return;
                state(this).sizeText = `${size[0]} × ${size[1]} px`;
                drawTag(ctx, state(this).sizeText, 0, this.size[1] + 6, NOTE);
            });
        } else if (name === INPAINT) {
            // what the last run found wrong (an empty mask), above the title until the next run
            chain(proto, "onDrawForeground", function (ctx) {
                if (this.flags?.collapsed) return;
                let y = -titleHeight() - 26;
                for (const text of state(this).runWarnings ?? []) {
                    drawTag(ctx, `⚠ ${text}`, 0, y, WARN);
                    y -= 24;
                }
            });
        } else if (EMPTY_LATENTS.has(name)) {
            // The combo names the preset width/height match, or "custom", however they were set (typed,
            // loaded from a workflow, changed by another extension): checked whenever the node is drawn.
            chain(proto, "onDrawForeground", function () {
                const combo = widget(this, PRESET_WIDGET);
                const shown = combo && matchingPreset(this);
                if (combo && combo.value !== shown) combo.value = shown;
            });
        }
    },

    nodeCreated(node) {
        if (EMPTY_LATENTS.has(node?.comfyClass)) addPresetCombo(node);
        if (node?.comfyClass === SIZE) followPresets(node);
        if (node?.comfyClass === SAMPLER) followVariant(node);
    },
});
