// The artist's loop in the page: Train -> Scene Prompt -> CLIPTextEncode -> KSampler, queued; the scene edited in
// the Scene Prompt widget and queued again. Returns, per Queue, the dynasyn.train steps the page received, the nodes
// the server reported as cached and the prompt Scene Prompt wrote.
const { buildGraph } = require("./graph.cjs");

module.exports = async (page, { runName, scenes }) => {
  const spec = { nodes: [
    { id: 1, type: "DynASynTinyModel", pos: [0, 0] },
    { id: 2, type: "DynASynExampleScene", pos: [0, 200] },
    { id: 3, type: "DynASynTrain", pos: [400, 0],
      links: { model: [1, 0], clip: [1, 1], vae: [1, 2], image: [2, "image"], masks: [2, "masks"], class_nouns: [2, "class_nouns"] },
      widgets: { phase1_steps: 2, phase2_steps: 1, resolution: 64, preview_every: 0, run_name: runName, save_as: "embeddings",
                 force_retrain: true } },
    { id: 4, type: "DynASynScenePrompt", pos: [800, 0], links: { run: [3, "run"] }, widgets: { scene: scenes[0] } },
    { id: 5, type: "CLIPTextEncode", pos: [800, 300], links: { clip: [3, "CLIP"], text: [4, "prompt"] } },
    { id: 6, type: "EmptyLatentImage", pos: [800, 500], widgets: { width: 256, height: 256, batch_size: 1 } },
    { id: 7, type: "KSampler", pos: [1200, 0], links: { model: [3, "MODEL"], positive: [5, 0], negative: [5, 0], latent_image: [6, 0] },
      widgets: { steps: 1 } },
    { id: 8, type: "VAEDecode", pos: [1200, 400], links: { samples: [7, 0], vae: [1, 2] } },
    { id: 9, type: "PreviewImage", pos: [1500, 0], links: { images: [8, 0] } },
  ] };
  const ids = await page.evaluate(buildGraph, spec);
  return await page.evaluate(async ({ ids, scenes }) => {
    const app = window.app, api = window.comfyAPI.api.api;
    let steps = [];
    api.addEventListener("dynasyn.train", ({ detail }) => steps.push(detail.step));
    const wait = async () => {
      for (let k = 0; k < 1200; k++) {
        await new Promise((r) => setTimeout(r, 250));
        const q = await (await fetch("/queue")).json();
        if (!q.queue_running.length && !q.queue_pending.length) return;
      }
    };
    const runs = [];
    for (const scene of scenes) {
      app.graph.getNodeById(ids[4]).widgets.find((w) => w.name === "scene").value = scene;
      steps = [];
      const earlier = new Set(Object.keys(await (await fetch("/history")).json()));
      await app.queuePrompt(0, 1);
      await wait();
      const [entry] = Object.entries(await (await fetch("/history")).json()).filter(([id]) => !earlier.has(id)).map(([, h]) => h);
      runs.push({
        status: entry.status.status_str, steps,
        cached: entry.status.messages.filter(([kind]) => kind === "execution_cached").flatMap(([, d]) => d.nodes),
        prompt: entry.outputs[String(ids[4])]?.text?.[0] ?? null,
      });
    }
    return { runs, train: String(ids[3]) };
  }, { ids, scenes });
};
