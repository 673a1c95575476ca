// Picks subject 1 with a dragged box and subject 2 with a click on the SAM picker, then saves the
// workflow and loads it back: returns the widget value before and after and what the picker drew.
const { buildGraph } = require("./graph.cjs");

module.exports = async (page, { image }) => {
  const ids = await page.evaluate(buildGraph, { nodes: [
    { id: 1, type: "LoadImage", pos: [20, 60], widgets: { image } },
    { id: 2, type: "DynASynSAMMasks", pos: [360, 60], size: [420, 640], widgets: { subject_prompts: "[]" },
      links: { image: [1, 0] } },
  ] });
  await page.evaluate((sam) => {
    const app = window.app;
    app.canvas.ds.offset = [0, 0]; app.canvas.ds.scale = 1; app.canvas.setDirty(true, true);
    window.__sam = sam;
  }, ids[2]);
  await page.waitForFunction(() => {
    const c = document.querySelector(".dynasyn-sam canvas");
    return c && c.getBoundingClientRect().width > 100 && c.height !== 240;  // the picture is in
  }, null, { timeout: 30000 });
  const canvas = page.locator(".dynasyn-sam canvas");
  const box = await canvas.boundingBox();
  const at = (u, v) => [box.x + u * box.width, box.y + v * box.height];
  // subject 1: drag a box over the left half
  await page.mouse.move(...at(0.1, 0.4));
  await page.mouse.down();
  await page.mouse.move(...at(0.3, 0.6), { steps: 5 });
  await page.mouse.move(...at(0.5, 0.8), { steps: 5 });
  await page.mouse.up();
  // subject 2: "+ subject", point mode, one click
  await page.locator(".dynasyn-sam button", { hasText: "+ subject" }).click();
  await page.locator(".dynasyn-sam select").nth(1).selectOption("pos");
  await page.mouse.click(...at(0.75, 0.6));
  return await page.evaluate(async () => {
    const app = window.app;
    const value = (id) => app.graph.getNodeById(id).widgets.find((w) => w.name === "subject_prompts").value;
    const before = value(window.__sam);
    const saved = JSON.parse(JSON.stringify(app.graph.serialize()));
    app.graph.clear();
    await app.loadGraphData(saved, true, true, "reloaded");
    await new Promise((r) => setTimeout(r, 2500));
    const node = app.graph.nodes.find((n) => n.type === "DynASynSAMMasks");
    const after = node.widgets.find((w) => w.name === "subject_prompts").value;
    node.dynasynPicker.draw();
    const c = node.dynasynPicker.canvas, px = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
    let colored = 0;   // pixels in the first subject's colour: its box was redrawn after the reload
    for (let i = 0; i < px.length; i += 4) if (px[i] < 120 && px[i + 1] > 150 && px[i + 2] > 200) colored++;
    return { before, after, saved: saved.nodes.find((n) => n.type === "DynASynSAMMasks").widgets_values, colored,
             natural: [c.width, c.height] };
  });
};
