// Builds a tiny training graph in the page, queues it from the page, and watches the loss chart
// fill from the server's dynasyn.train events; returns what the chart holds and how much it drew.
// With inSubgraph, the Train node is first converted into a subgraph (as the canvas menu does), so the
// server reports it by an execution id such as "12:5".
const { buildGraph } = require("./graph.cjs");

module.exports = async (page, { steps, inSubgraph }) => {
  const spec = { nodes: [
    { id: 1, type: "DynASynTinyModel", pos: [0, 0] },
    { id: 2, type: "DynASynExampleScene", pos: [0, 200] },
    { id: 6, type: "DynASynTrain", pos: [400, 0],
      links: { model: [1, 0], clip: [1, 1], vae: [1, 2], image: [2, "image"], masks: [2, "masks"],
               class_nouns: [2, "class_nouns"] },
      widgets: { phase1_steps: steps[0], phase2_steps: steps[1], resolution: 64,
                 preview_every: 2, run_name: "chart_" + Date.now(), save_as: "embeddings",
                 force_retrain: true } },  // the same inputs would load the finished run: no events to draw
    { id: 7, type: "SaveImage", pos: [800, 0], links: { images: [6, 3] } },
  ] };
  const id = (await page.evaluate(buildGraph, spec))[6];
  await page.evaluate(async ({ id, inSubgraph }) => {
    const app = window.app, api = window.comfyAPI.api.api;
    window.__dynasynIds = new Set();
    api.addEventListener("dynasyn.train", ({ detail }) => window.__dynasynIds.add(String(detail.node)));
    let train = app.graph.getNodeById(id);
    if (inSubgraph) {
      const { node } = app.graph.convertToSubgraph(new Set([train]));
      train = node.subgraph.nodes.find((n) => n.type === "DynASynTrain");
    }
    window.__dynasynTrain = train;
    app.canvas.ds.offset = [0, 0]; app.canvas.ds.scale = 0.8; app.canvas.setDirty(true, true);
    await app.queuePrompt(0, 1);
  }, { id, inSubgraph: !!inSubgraph });
  const total = steps[0] + steps[1];
  await page.waitForFunction((total) => {
    const c = window.__dynasynTrain?.dynasynChart;
    return c && c.last && c.last.step === total;
  }, total, { timeout: 300000, polling: 250 });
  await page.waitForTimeout(300);
  return await page.evaluate(() => {
    const c = window.__dynasynTrain.dynasynChart;
    const ctx = c.canvas.getContext("2d");
    const px = ctx.getImageData(0, 0, c.canvas.width, c.canvas.height).data;
    let drawn = 0;
    for (let i = 0; i < px.length; i += 4) if (Math.abs(px[i] - 27) + Math.abs(px[i + 1] - 27) + Math.abs(px[i + 2] - 27) > 30) drawn++;
    return { steps: c.steps, terms: Object.keys(c.terms), head: c.head.textContent, drawn, pixels: px.length / 4,
             preview: c.preview.style.display, ids: [...window.__dynasynIds],
             graphs: window.__dynasynTrain.graph === window.app.graph ? "root" : "subgraph" };
  });
};
