// Nodes added as from the node menu (LiteGraph.createNode, every widget at its default, nothing fixed by the test),
// queued from the page twice: the seeds of DynASyn Train and the Tiny Model must not change, while a core KSampler's
// seed (control after generate = randomize by default) does, which shows the page applied its seed controls.
// Then a workflow saved before the pack's seeds lost their control widget loads with its values aligned.
const { buildGraph } = require("./graph.cjs");

module.exports = async (page, { runName }) => {
  const spec = { keepControls: true, nodes: [
    { id: 1, type: "DynASynTinyModel", pos: [0, 0] },
    { id: 2, type: "DynASynExampleScene", pos: [0, 200] },
    { id: 3, type: "DynASynTrain", pos: [400, 0],
      links: { model: [1, 0], clip: [1, 1], vae: [1, 2], image: [2, "image"], masks: [2, "masks"], class_nouns: [2, "class_nouns"] },
      widgets: { phase1_steps: 1, phase2_steps: 0, resolution: 64, preview_every: 0, run_name: runName, save_as: "embeddings" } },
    { id: 4, type: "SaveImage", pos: [800, 0], links: { images: [3, "loss_curve"] } },
    { id: 5, type: "CLIPTextEncode", pos: [0, 700], links: { clip: [1, 1] }, widgets: { text: "a ball" } },
    { id: 6, type: "EmptyLatentImage", pos: [0, 900], widgets: { width: 64, height: 64, batch_size: 1 } },
    { id: 7, type: "KSampler", pos: [400, 700], links: { model: [1, 0], positive: [5, 0], negative: [5, 0], latent_image: [6, 0] },
      widgets: { steps: 1 } },
    { id: 8, type: "VAEDecode", pos: [800, 700], links: { samples: [7, 0], vae: [1, 2] } },
    { id: 9, type: "PreviewImage", pos: [1000, 700], links: { images: [8, 0] } },
  ] };
  const ids = await page.evaluate(buildGraph, spec);
  return await page.evaluate(async ({ ids }) => {
    const app = window.app;
    const node = (k) => app.graph.getNodeById(ids[k]);
    const seed = (k) => node(k).widgets.find((w) => w.name === "seed").value;
    const controls = (k) => node(k).widgets.filter((w) => w.name === "control_after_generate").map((w) => w.value);
    const wait = async () => {
      for (let k = 0; k < 1200; k++) {
        await new Promise((r) => setTimeout(r, 250));
        const q = await (await fetch("/queue")).json();
        if (!q.queue_running.length && !q.queue_pending.length) return;
      }
    };
    const earlier = new Set(Object.keys(await (await fetch("/history")).json()));
    const before = { train: seed(3), tiny: seed(1), ksampler: seed(7) };
    const out = { controls: { train: controls(3), tiny: controls(1), ksampler: controls(7) }, before, after: [] };
    for (let i = 0; i < 2; i++) {
      await app.queuePrompt(0, 1);
      await wait();
      out.after.push({ train: seed(3), tiny: seed(1), ksampler: seed(7) });
    }
    out.history = Object.entries(await (await fetch("/history")).json())
      .filter(([id]) => !earlier.has(id)).map(([, h]) => h.status.status_str);

    // the Train node as an older version of the pack saved it: a control value right after the seed
    const saved = app.graph.serialize();
    const t = saved.nodes.find((n) => n.type === "DynASynTrain");
    const names = node(3).widgets.map((w) => w.name);
    const at = names.indexOf("seed");
    t.widgets_values.splice(at + 1, 0, "randomize");
    await app.loadGraphData(saved, true, true, "old seeds");
    const reloaded = app.graph.nodes.find((n) => n.type === "DynASynTrain");
    out.reloaded = Object.fromEntries(reloaded.widgets.filter((w) => w.name !== "loss_chart").map((w) => [w.name, w.value]));
    const { output } = await app.graphToPrompt();
    out.reloadedPrompt = Object.values(output).find((n) => n.class_type === "DynASynTrain").inputs;
    return out;
  }, { ids });
};
