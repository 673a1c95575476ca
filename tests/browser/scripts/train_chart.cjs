// Builds a tiny training graph in the page, queues it from the page, and watches the loss chart
// fill from the server's dynasyn.train events; returns what the chart holds and how much it drew.
const { buildGraph } = require("./graph.cjs");

module.exports = async (page, { image, masks, steps }) => {
  const spec = { nodes: [
    { id: 1, type: "DynASynTinyModel", pos: [0, 0] },
    { id: 2, type: "LoadImage", pos: [0, 200], widgets: { image } },
    { id: 3, type: "LoadImageMask", pos: [0, 600], widgets: { image: masks[0], channel: "red" } },
    { id: 4, type: "LoadImageMask", pos: [0, 900], widgets: { image: masks[1], channel: "red" } },
    { id: 5, type: "DynASynMaskBatch", pos: [300, 600], links: { mask_1: [3, 0], mask_2: [4, 0] } },
    { id: 6, type: "DynASynTrain", pos: [400, 0],
      links: { model: [1, 0], clip: [1, 1], vae: [1, 2], image: [2, 0], masks: [5, 0] },
      widgets: { class_nouns: "ball, box", phase1_steps: steps[0], phase2_steps: steps[1], resolution: 64,
                 preview_every: 2, run_name: "chart_" + Date.now(), save_as: "embeddings" } },
    { id: 7, type: "SaveImage", pos: [800, 0], links: { images: [6, 3] } },
  ] };
  const id = (await page.evaluate(buildGraph, spec))[6];
  await page.evaluate(async () => {
    const app = window.app;
    app.canvas.ds.offset = [0, 0]; app.canvas.ds.scale = 0.8; app.canvas.setDirty(true, true);
    await app.queuePrompt(0, 1);
  });
  const total = steps[0] + steps[1];
  await page.waitForFunction(({ id, total }) => {
    const c = window.app.graph.getNodeById(id)?.dynasynChart;
    return c && c.last && c.last.step === total;
  }, { id, total }, { timeout: 300000, polling: 250 });
  await page.waitForTimeout(300);
  return await page.evaluate((id) => {
    const c = window.app.graph.getNodeById(id).dynasynChart;
    const ctx = c.canvas.getContext("2d");
    const px = ctx.getImageData(0, 0, c.canvas.width, c.canvas.height).data;
    let drawn = 0;
    for (let i = 0; i < px.length; i += 4) if (Math.abs(px[i] - 27) + Math.abs(px[i + 1] - 27) + Math.abs(px[i + 2] - 27) > 30) drawn++;
    return { steps: c.steps, terms: Object.keys(c.terms), head: c.head.textContent, drawn, pixels: px.length / 4,
             preview: c.preview.style.display };
  }, id);
};
